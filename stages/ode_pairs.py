"""Stage `ode_pairs`: deterministic teacher couplings (noise z, sample, label).

An EDM teacher solves its PF-ODE with Heun from x = σ_max·z; a rectified flow (method `rf`) solves
its own ODE in its own process from z0 = z (`methods.rf.ode_solve`: RK45 with rtol = atol = 1e-5 as
RF's reflow code, or Euler). `pairs.npz` stores the *standard normal* z (so a generator whose input
is σ_max·z, or z itself for a flow, sees exactly the noise that made the pair; a flow whose process has a
`source` mixture stores its draw from that mixture), the sample and the
class label (−1 for unconditional). The manifest's metrics carry `pairs_digest`, the content digest
of (noise, sample, label) (`methods.rf.pairs_digest`); a flow reflowed on the set records the same
digest in its model.json. CLI: python -m stages.run RECIPE.yaml STAGE
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from fastgen_core.config import Strict
from fastgen_core.data import cached_data
from fastgen_core.methods import rf
from fastgen_core.models import load_model
from fastgen_core.samplers import edm_sample

from .spec import Problem, StageSpec, one_input

TEACHERS = ("edm", "rf")  # the methods whose ODE this stage solves


class PairsConfig(Strict):
    n_pairs: int = Field(20000, gt=0, description="number of (noise, sample, label) teacher couplings")
    steps: int = Field(18, gt=0, description="edm: Heun steps of the teacher ODE solve (NFE = 2·steps − 1); "
                       "rf with solver euler: Euler steps")
    batch_size: int = Field(4096, gt=0, description="samples per solver batch")
    solver: Literal["rk45", "euler"] | None = Field(
        None, description="rf teachers: rk45 (adaptive, rtol = atol = 1e-5; RF's reflow pairs) or euler "
        "(`steps` steps); None: rk45. edm teachers always use Heun")

    omit_at_default = {"solver": None}  # stages written before it existed keep their params digest (Strict)


class Spec(StageSpec):
    """Deterministic couplings of a teacher (input `teacher`: an edm or rf model)."""

    kind: Literal["ode_pairs"]
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="how many pairs, and the solver")

    def problems(self, recipe, name: str) -> list[Problem]:
        at, teacher = f"stages.{name}.inputs", one_input(self, "teacher")
        if set(self.inputs) != {"teacher"} or teacher is None:
            return [(at, "an ode_pairs stage takes one input, `teacher`: the model whose ODE it solves")]
        method = recipe.model_method(teacher) if teacher in recipe.stages else None
        if teacher in recipe.stages and method not in TEACHERS:
            return [(f"{at}.teacher", f"stage {teacher!r} is not an EDM model or a rectified flow (method "
                     f"{method!r}): pairs are solved with the EDM Heun sampler or the flow's own ODE")]
        if method == "edm" and self.pairs.solver is not None:
            return [(f"stages.{name}.pairs.solver", "an EDM teacher is solved with Heun (`steps`): remove solver")]
        return []


def _solve(teacher, z, y, cfg: PairsConfig):
    """The teacher's ODE solution from standard-normal z; returns (sample, evaluations)."""
    if teacher.meta["method"] == "edm":
        return edm_sample(teacher.denoiser(), z, teacher.noise, cfg.steps, "heun", class_labels=y), 2 * cfg.steps - 1
    return rf.ode_solve(teacher, z, cfg.solver or "rk45", cfg.steps, class_labels=y)


def run(ctx) -> None:
    cfg, recipe = ctx.spec.pairs, ctx.recipe
    teacher = load_model(ctx.input("teacher").path, ctx.device)
    data = cached_data(recipe.data)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    pairs, nfes = {}, []  # filled in place: a list of batches then their concatenation would hold both
    for start in tqdm(range(0, cfg.n_pairs, cfg.batch_size), desc="ode_pairs", mininterval=2.0):
        n = min(cfg.batch_size, cfg.n_pairs - start)
        z = teacher.noise.draw(n, data.shape, gen)  # standard normal, or a flow's source mixture
        y = None
        if teacher.num_classes > 0:
            y = data.y[torch.randint(len(data.y), (n,), generator=gen)]
        with torch.no_grad():
            x, nfe = _solve(teacher, z.to(ctx.device), None if y is None else y.to(ctx.device), cfg)
        got = {"noise": z, "sample": x.cpu(), "label": y if y is not None else torch.full((n,), -1)}
        for k, v in got.items():
            if k not in pairs:
                pairs[k] = np.empty((cfg.n_pairs, *v.shape[1:]), dtype=v.numpy().dtype)
            pairs[k][start:start + n] = v.numpy()
        nfes.append(nfe)
    np.savez(ctx.out / "pairs.npz", **pairs)
    numbers = {"n_pairs": cfg.n_pairs, "teacher_nfe": nfes[0] if len(set(nfes)) == 1 else float(np.mean(nfes))}
    ctx.tracker.log_metrics(0, numbers)
    ctx.metrics = {**numbers, "pairs_digest": rf.pairs_digest(pairs)}
