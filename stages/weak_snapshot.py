"""Stage `weak_snapshot`: the weak guide D_weak of autoguidance (Karras et al. 2024, Eq. 2;
docs/methods.md §12), the same task and conditioning as the main model, but worse. `guide.mode`
picks how it is made:

- `snapshot`: an early EMA snapshot of the `teacher` input, taken by the training loop at step
  `guide.step` (one of the teacher's `train.snapshots`, with its `train.snapshot_ema_decay`),
  copied out as a standalone model folder;
- `smaller`: the stage's own (smaller) `network` trained with its `method` for its (fewer) steps.

Output: model.safetensors + model.json, like a teacher. CLI: python -m stages.run RECIPE.yaml STAGE
"""
from __future__ import annotations

import shutil
from typing import Literal

from pydantic import Field

from fastgen_core.config import NetworkConfig, Strict, TrainConfig
from fastgen_core.models import snapshot_dir
from fastgen_core.noise import NoiseProcess

from . import train
from .spec import MethodConfig, Problem, StageError, StageSpec


class GuideConfig(Strict):
    mode: Literal["snapshot", "smaller"] = Field(
        "smaller", description="snapshot: an early EMA snapshot of the `teacher` input (its train.snapshots); "
        "smaller: train this stage's own (smaller) network with its method for its (fewer) steps")
    step: int | None = Field(None, gt=0, description="snapshot: which of the teacher's train.snapshots to take")


class Spec(StageSpec):
    """The weak guide of autoguidance, from the `teacher` input."""

    kind: Literal["weak_snapshot"]
    guide: GuideConfig = Field(default_factory=GuideConfig, description="how the weak guide is made")
    method: MethodConfig | None = Field(None, description="smaller: the method (the teacher's)")
    network: NetworkConfig | None = Field(None, description="smaller: the guide's (smaller) network")
    train: TrainConfig = Field(default_factory=TrainConfig, description="smaller: training-loop settings")
    noise: NoiseProcess | None = Field(None, description="smaller: noise process (None: the recipe's)")

    def model_method(self, recipe, seen: tuple = ()) -> str | None:
        if self.guide.mode == "snapshot":
            t = self.inputs.get("teacher")
            return recipe.model_method(t, seen) if isinstance(t, str) else None
        return self.method.name if self.method else None

    def problems(self, recipe, name: str) -> list[Problem]:
        """A snapshot guide names a teacher stage that keeps that snapshot; a smaller guide trains
        with its teacher's method (the same task and conditioning)."""
        at, probs = f"stages.{name}", []
        teacher = self.inputs.get("teacher")
        if teacher is not None and not isinstance(teacher, str):
            return [(f"{at}.inputs.teacher", "a weak_snapshot stage takes one teacher")]
        t = recipe.stages.get(teacher) if teacher else None
        if self.guide.mode == "snapshot":
            if teacher is None:
                probs.append((f"{at}.inputs.teacher", "guide.mode snapshot needs the teacher stage it snapshots"))
            if self.guide.step is None:
                probs.append((f"{at}.guide.step", "guide.mode snapshot needs the snapshot step"))
            elif t is not None and self.guide.step not in getattr(getattr(t, "train", None), "snapshots", []):
                probs.append((f"{at}.guide.step", f"stage {teacher!r} keeps no snapshot at step {self.guide.step} "
                              f"(its train.snapshots: {getattr(getattr(t, 'train', None), 'snapshots', [])})"))
            for field in ("method", "network", "noise"):
                if getattr(self, field) is not None:
                    probs.append((f"{at}.{field}", "guide.mode snapshot copies the teacher's model: remove it"))
            return probs
        if self.guide.step is not None:
            probs.append((f"{at}.guide.step", "only guide.mode snapshot takes a step"))
        if self.network is None:
            probs.append((f"{at}.network", "guide.mode smaller needs the guide's (smaller) network"))
        if self.method is None:
            probs.append((f"{at}.method", "guide.mode smaller needs the method it trains with (the teacher's)"))
            return probs
        if t is not None and recipe.model_method(teacher) != self.method.name:
            probs.append((f"{at}.method.name", f"the guide must be trained like its teacher {teacher!r} "
                          f"(method {recipe.model_method(teacher)!r})"))
        # the teacher input only names what to imitate: the method trains without inputs
        own = self.model_copy(update={"inputs": {}})
        return probs + train.method_problems(own, recipe, name) + train.settings_problems(self, recipe, name)


def run(ctx) -> None:
    guide = ctx.spec.guide
    if guide.mode == "smaller":
        train.run(ctx)
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

