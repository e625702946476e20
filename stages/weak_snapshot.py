"""Stage `weak_snapshot`: the weak guide D_weak of autoguidance (Karras et al. 2024; METHODS.md §12),
the same task and conditioning as the main model, but worse. `guide.mode` picks how it is made:

- `snapshot`: an early EMA snapshot of the `teacher` input, taken by the training loop at step
  `guide.step` (one of the teacher's `train.snapshots`, with its `train.snapshot_ema_decay`),
  copied out as a standalone model folder;
- `smaller`: the stage's own (smaller) `network` trained with its `method` for its (fewer) steps.

Output: model.safetensors + model.json, like a teacher. CLI: python -m stages.weak_snapshot RECIPE.yaml STAGE
"""
from __future__ import annotations

import shutil
import sys

from fastgen_core.models import snapshot_dir

from .runtime import StageError, main
from .training import train_stage


def run(ctx) -> None:
    guide = ctx.spec.guide
    if guide.mode == "smaller":
        train_stage(ctx)
        return
    teacher = ctx.input("teacher")
    src = snapshot_dir(teacher.path, guide.step)
    if not (src / "model.json").is_file():
        raise StageError(f"{ctx.recipe.path}: stages.{ctx.name}.guide.step: {teacher.stage!r} output has no "
                         f"snapshot at step {guide.step} ({src})")
    for f in ("model.safetensors", "model.json"):
        shutil.copy2(src / f, ctx.out / f)
    ctx.metrics = {"snapshot_step": guide.step}
    ctx.tracker.log_metrics(0, ctx.metrics)


if __name__ == "__main__":
    sys.exit(main("weak_snapshot"))
