"""Stage `ode_pairs`: deterministic teacher couplings (noise z, sample, label).

The teacher solves its PF-ODE with Heun from x = σ_max·z; `pairs.npz` stores the *standard normal*
z (so a generator whose input is σ_max·z sees exactly the noise that made the pair), the sample and
the class label (−1 for unconditional). CLI: python -m stages.run RECIPE.yaml STAGE
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from fastgen_core.config import Strict
from fastgen_core.data import cached_data
from fastgen_core.models import load_model
from fastgen_core.samplers import edm_sample

from .spec import Problem, StageSpec, one_input


class PairsConfig(Strict):
    n_pairs: int = Field(20000, gt=0, description="number of (noise, sample, label) teacher couplings")
    steps: int = Field(18, gt=0, description="Heun steps of the teacher ODE solve (NFE = 2·steps − 1)")
    batch_size: int = Field(4096, gt=0, description="samples per solver batch")


class Spec(StageSpec):
    """Deterministic couplings of a teacher (input `teacher`)."""

    kind: Literal["ode_pairs"]
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="how many pairs, and the solver")

    def problems(self, recipe, name: str) -> list[Problem]:
        at, teacher = f"stages.{name}.inputs", one_input(self, "teacher")
        if set(self.inputs) != {"teacher"} or teacher is None:
            return [(at, "an ode_pairs stage takes one input, `teacher`: the model whose ODE it solves")]
        if teacher in recipe.stages and recipe.model_method(teacher) != "edm":
            return [(f"{at}.teacher", f"stage {teacher!r} is not an EDM model (method "
                     f"{recipe.model_method(teacher)!r}): pairs are solved with the EDM Heun sampler")]
        return []


def run(ctx) -> None:
    cfg, recipe = ctx.spec.pairs, ctx.recipe
    teacher = load_model(ctx.input("teacher").path, ctx.device)
    data = cached_data(recipe.data)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    zs, xs, ys = [], [], []
    for start in tqdm(range(0, cfg.n_pairs, cfg.batch_size), desc="ode_pairs", mininterval=2.0):
        n = min(cfg.batch_size, cfg.n_pairs - start)
        z = torch.randn((n, *data.shape), generator=gen)
        y = None
        if teacher.num_classes > 0:
            y = data.y[torch.randint(len(data.y), (n,), generator=gen)]
        with torch.no_grad():
            x = edm_sample(teacher.denoiser(), z.to(ctx.device), teacher.noise, cfg.steps, "heun",
                           class_labels=None if y is None else y.to(ctx.device))
        zs.append(z), xs.append(x.cpu()), ys.append(y if y is not None else torch.full((n,), -1))
    np.savez(ctx.out / "pairs.npz", noise=torch.cat(zs).numpy(), sample=torch.cat(xs).numpy(),
             label=torch.cat(ys).numpy())
    ctx.metrics = {"n_pairs": cfg.n_pairs, "teacher_nfe": 2 * cfg.steps - 1}
    ctx.tracker.log_metrics(0, ctx.metrics)

