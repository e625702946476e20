"""Prefect flows: the recipe DAG as tasks calling the same stage functions as `dvc repro`."""
