"""Stage `teacher`: train the stage's method with the one loop (locally or on Ray Train) and save
the model (model.safetensors + model.json). CLI: python -m stages.teacher RECIPE.yaml STAGE"""
from __future__ import annotations

import sys

from .runtime import main
from .training import train_stage


def run(ctx) -> None:
    train_stage(ctx)


if __name__ == "__main__":
    sys.exit(main("teacher"))
