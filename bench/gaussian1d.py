"""The 1D Gaussian check of Align Your Flow (docs/methods.md §3): multistep W2 of consistency models vs
flow maps on data N(0, c²), c = 0.5.

Six curves, W2 to the data as a function of the number of sampling steps:
- `cm_exact`: the closed-form optimal CM f*(x_t, t) = c·x_t/√(t² + (1−t)²c²). Exact in
  distribution at every step count (each re-noised input has the right marginal), so W2 = 0: any
  rise with steps comes from model error, not from the optimum itself;
- `cm_delta`: the same CM with a 10% relative error in its F (closed form): falls to a minimum at a
  few steps, then rises without bound;
- `cm_delta_out`: the same CM with a 2% relative error in its output x̂0 (closed form): rises from
  the first step on;
- `flow_map_delta`: the exact flow map with the same 10% relative error in its F (closed form):
  never rises;
- `cm_trained`: a consistency-distilled model (`methods.cd`) trained here with the exact Gaussian
  teacher, sampled with CM multistep sampling (re-noising between steps);
- `flow_map_trained`: an AYF-EMD flow map (`methods.ayf`) with the same network, teacher, optimiser
  (Adam, β2 = 0.99) and budget, sampled deterministically x ← f(x, t_i, t_{i+1}); a quarter of its
  batch has s = t (`--diagonal`). Without that, its velocity F(x, t, t) stays a few % off and many
  short jumps compound it: W2 0.0197 at 32 Karras steps against 0.002 at 8 (with it: 0.006, 0.006).
Sampling times: `--grid karras` (default) each method's own sampler on the Karras σ grid (ρ = 7);
`--grid uniform` both on t_i = t_max·(1 − i/n) in flow-matching time, as in the closed-form analysis.
Trained curves are Monte Carlo: W2 between 200k samples' quantiles and the exact N(0, c²) ones.
Writes bench/results/gaussian1d.json and .png; prints a table.

    python bench/gaussian1d.py [--steps 4000] [--c 0.5] [--grid uniform|karras] [--diagonal 0.25]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastgen_core import loop  # noqa: E402
from fastgen_core.config import NetworkConfig  # noqa: E402
from fastgen_core.data import Dataset  # noqa: E402
from fastgen_core.methods import ayf, cd  # noqa: E402
from fastgen_core.methods.base import Context  # noqa: E402
from fastgen_core.models import LoadedModel  # noqa: E402
from fastgen_core.noise import EDM  # noqa: E402
from fastgen_core.noise import to_edm  # noqa: E402
from fastgen_core.config import TrainConfig  # noqa: E402
from fastgen_core.samplers import cm_multistep  # noqa: E402

STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 32]
NET = NetworkConfig(arch="mlp", width=64, depth=2, emb_dim=32)


class GaussianTeacher:
    """The exact EDM denoiser of N(0, c²): D(x, σ) = c²/(c² + σ²)·x (a LoadedModel-like input)."""

    def __init__(self, c: float):
        self.c, self.noise, self.nets = c, EDM(), torch.nn.ModuleDict()

    def meta_net_cfg(self, name="net"):
        return NET

    def denoiser(self, name="net"):
        c2 = self.c**2
        return lambda x, sigma, **k: c2 / (c2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2) * x


def w2_to_gaussian(x: torch.Tensor, c: float) -> float:
    """1D W2 between the empirical distribution of x and N(0, c²), by matching quantiles."""
    x = x.reshape(-1).double().sort().values
    n = x.numel()
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = c * math.sqrt(2) * torch.erfinv(2 * p - 1)
    return float(((x - q) ** 2).mean().sqrt())


def train(mod, cfg, data, teacher, steps: int, lr: float, seed: int = 0):
    torch.manual_seed(seed)
    m = mod.Method(cfg, Context(data, EDM(), NET, {"teacher": teacher}))
    tc = TrainConfig(steps=steps, batch_size=512, lr=lr, ema_decay=0.995, log_every=max(1, steps // 10),
                     ckpt_every=10**9, betas=(0.9, 0.99))
    states = loop.train(m, tc, None, seed=seed, progress=True)
    for n, sd in states.items():
        m.nets[n].load_state_dict(sd)
    m.nets.eval()
    meta = {"method": cfg.name, "method_config": cfg.model_dump(mode="json")}
    return LoadedModel(meta, m.nets, EDM())


def uniform_fm_times(n: int) -> list[float]:
    """t_i = t_max·(1 − i/n), i = 0..n−1, then 0 (flow-matching time, t_max = σ_max/(1 + σ_max))."""
    t_max = ayf.t_range(EDM())[1]
    return [t_max * (1 - i / n) for i in range(n)] + [0.0]


def sample_on_grid(model, z: torch.Tensor, n: int, grid: str) -> torch.Tensor:
    """n steps of the model's sampler: its own (Karras) times, or the uniform FM-time grid."""
    if grid == "karras":
        return model.sample(z, n)
    times = uniform_fm_times(n)
    if model.meta["method"] == "ayf":
        return ayf.flow_map_sample(model.nets["net"], model.noise, z, times)
    sigmas = [float(to_edm("fm", torch.tensor(t, dtype=torch.float64))[1]) for t in times[:-1]]
    return cm_multistep(cd.consistency_fn(model), z, sigmas, model.noise.sigma_min)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000, help="training iterations of each model")
    ap.add_argument("--c", type=float, default=0.5)
    ap.add_argument("--n", type=int, default=200_000, help="samples per W2 estimate")
    ap.add_argument("--grid", choices=["uniform", "karras"], default="karras", help="sampling times (see docstring)")
    ap.add_argument("--diagonal", type=float, default=0.25,
                    help="flow map: share of the batch with s = t (ayf `diagonal`); 0 = uniform s only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = a.c * torch.randn(20_000, 1, generator=g)
    data = Dataset(x, None, a.c * torch.randn(5000, 1, generator=g), None, 0, None)
    teacher = GaussianTeacher(a.c)

    t0 = time.perf_counter()
    cm_model = train(cd, cd.Config(N=18, init_from_teacher=False), data, teacher, a.steps, 1e-3)
    fm_model = train(ayf, ayf.Config(objective="emd", init_from_teacher=False, warmup_steps=a.steps // 3,
                                     diagonal=a.diagonal), data, teacher, a.steps, 1e-3)
    train_s = time.perf_counter() - t0

    delta = 0.1
    rows = []
    for n in STEPS:
        z = torch.randn(a.n, 1, generator=torch.Generator().manual_seed(100 + n))
        torch.manual_seed(200 + n)
        rows.append({
            "steps": n,
            "cm_exact": ayf.gaussian_cm_multistep_w2(lambda v, t: ayf.gaussian_optimal_cm(v, t, a.c), n, a.c),
            "cm_delta": ayf.gaussian_cm_multistep_w2(lambda v, t: ayf.gaussian_perturbed_cm(v, t, a.c, delta), n, a.c),
            "cm_delta_out": ayf.gaussian_cm_multistep_w2(lambda v, t: ayf.gaussian_scaled_cm(v, t, a.c, 0.02), n, a.c),
            "flow_map_delta": ayf.gaussian_flow_map_w2(
                lambda v, t, s: ayf.gaussian_perturbed_flow_map(v, t, s, a.c, delta), n, a.c),
            "cm_trained": w2_to_gaussian(sample_on_grid(cm_model, z, n, a.grid), a.c),
            "flow_map_trained": w2_to_gaussian(sample_on_grid(fm_model, z, n, a.grid), a.c),
        })
    floor = w2_to_gaussian(a.c * torch.randn(a.n, 1, generator=torch.Generator().manual_seed(7)), a.c)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.machine(), "threads": 1, "torch": torch.__version__}
    (out / "gaussian1d.json").write_text(json.dumps(
        {"machine": machine, "c": a.c, "train_steps": a.steps, "grid": a.grid, "delta": delta,
         "diagonal": a.diagonal, "train_s": round(train_s, 1),
         "mc_floor": floor, "rows": rows}, indent=2))
    cols = ["cm_exact", "cm_delta", "cm_delta_out", "flow_map_delta", "cm_trained", "flow_map_trained"]
    print("steps | " + " | ".join(cols))
    for r in rows:
        print(f"{r['steps']:5d} | " + " | ".join(f"{r[c]:.4f}" for c in cols))
    print(f"Monte-Carlo floor (exact samples): {floor:.4f}; training {train_s:.0f} s")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for c_ in cols:
        ax.plot([r["steps"] for r in rows], [max(r[c_], 1e-5) for r in rows], marker="o",
                label=c_ + (" (W2 = 0, drawn at 1e-5)" if c_ == "cm_exact" else ""))
    ax.axhline(floor, ls="--", c="k", lw=1, label="Monte-Carlo floor")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="W2 to N(0, c²)",
           title=f"1D Gaussian, c = {a.c}: CM vs flow map ({a.grid} times)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gaussian1d.png", dpi=110)
    print(f"wrote {out / 'gaussian1d.json'} and gaussian1d.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
