"""Stages: one module per stage kind, each a thin CLI + `run(ctx)`; plus the runtime they share
(`runtime`: inputs, manifests, atomic outputs; `training`: local or Ray Train; `tracking`: MLflow)."""
