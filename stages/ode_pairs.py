"""Stage `ode_pairs`: deterministic teacher couplings (noise z, sample, label).

The teacher solves its PF-ODE with Heun from x = σ_max·z; `pairs.npz` stores the *standard normal*
z (so a generator whose input is σ_max·z sees exactly the noise that made the pair), the sample and
the class label (−1 for unconditional). CLI: python -m stages.ode_pairs RECIPE.yaml STAGE
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from fastgen_core.models import load_model
from fastgen_core.samplers import edm_sample

from .runtime import main
from .training import _data


def run(ctx) -> None:
    cfg, recipe = ctx.spec.pairs, ctx.recipe
    teacher = load_model(ctx.input("teacher").path, ctx.device)
    data = _data(recipe.data.model_dump_json())
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


if __name__ == "__main__":
    sys.exit(main("ode_pairs"))
