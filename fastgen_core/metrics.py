"""Sample-quality metrics: sliced Wasserstein, toy-density metrics, Frechet distance, and a
helper that reports any metric next to its real-data floor."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fastgen_core.data import OFF_SUPPORT_LOG_PROB, ToyDensity

#----------------------------------------------------------------------------


def _quantiles(sorted_x: torch.Tensor, m: int) -> torch.Tensor:
    """Linearly interpolated quantiles at levels (i + 0.5) / m along the last dim of `sorted_x`."""
    n = sorted_x.shape[-1]
    pos = ((torch.arange(m, dtype=torch.float64) + 0.5) * n / m - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo
    return sorted_x[..., lo] * (1 - frac) + sorted_x[..., hi] * frac


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 512, seed: int = 0) -> float:
    """Sliced W2: sqrt of the mean, over `n_proj` random unit directions (fixed by `seed`), of
    the squared 1D W2 distance between the projections of a (N, D) and b (M, D). N != M is handled
    by comparing both at max(N, M) interpolated quantiles."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    dirs = torch.randn(n_proj, a.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = (dirs @ a.T).sort(dim=1).values, (dirs @ b.T).sort(dim=1).values  # (n_proj, N), (n_proj, M)
    if pa.shape[1] != pb.shape[1]:
        m = max(pa.shape[1], pb.shape[1])
        pa, pb = _quantiles(pa, m), _quantiles(pb, m)
    return float((pa - pb).square().mean().sqrt())


def toy_metrics(samples: torch.Tensor, density: ToyDensity, reference: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Metrics of 2D samples against a known toy density.

    swd:           sliced W2 to `reference` (held-out true samples).
    nll:           mean -log p(x) under the true density, log p clipped at -30 (lower is better).
    mode_coverage: fraction of the K modes (mixture components / checkerboard squares) that are
                   covered; mode k is covered when at least N / (4K) of the N samples are on
                   support and assigned to k by `density.mode_of`.
    off_support:   fraction of samples not on support (`density.on_support`).
    mode_recall:   how much of the true mode mass the on-support samples reproduce,
                   sum_k min(p_k, pi_k), with p_k the share of on-support samples assigned to mode
                   k and pi_k its true weight: 1 when they spread over the modes in the true
                   proportions; dropping modes (branches) of total mass m lowers it by at least m.
    """
    samples = samples.double()
    n, k = len(samples), density.num_modes
    on = density.on_support(samples)
    counts = torch.bincount(density.mode_of(samples)[on], minlength=k)
    return {
        "swd": sliced_wasserstein(samples, reference, seed=seed),
        "nll": float(-density.log_prob(samples).clamp(min=OFF_SUPPORT_LOG_PROB).mean()),
        "mode_coverage": float((counts >= n / (4 * k)).double().mean()),
        "off_support": float(1 - on.double().mean()),
        "mode_recall": float(torch.minimum(counts.double() / max(int(counts.sum()), 1), density.weights).sum()),
    }


def _mean_cov(f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = f.double().flatten(1).numpy()
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features f1 (N, F) and f2 (M, F):
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2). The symmetric eigen form equals the
    usual tr sqrtm(S1 S2) and is numerically stable; the result is clamped to >= 0."""
    mu1, s1 = _mean_cov(f1)
    mu2, s2 = _mean_cov(f2)
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(min=0)).sum()
    return max(float(np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross), 0.0)


def floor_metrics(metric_fn: Callable[[torch.Tensor], dict[str, float]], real_pool: torch.Tensor, n: int,
                  seeds) -> list[dict[str, float]]:
    """The floor, per seed: metric_fn on n rows of `real_pool` drawn without replacement by that
    seed. It depends on nothing generated: compute it once per evaluation and pass it on."""
    if len(real_pool) < n:
        raise ValueError(f"real_pool has {len(real_pool)} rows, need at least n = {n}")
    picks = (torch.randperm(len(real_pool), generator=torch.Generator().manual_seed(s))[:n] for s in seeds)
    return [metric_fn(real_pool[p]) for p in picks]


def with_floor(metric_fn: Callable[[torch.Tensor], dict[str, float]],
               samples_fn: Callable[[int], torch.Tensor],
               real_pool: torch.Tensor, n: int, seeds,
               floor: list[dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """A metric over seeds, next to its floor: held-out real data against real data, same
    sample count.

    For every seed: metric_fn(samples_fn(seed)) on the generator's n samples, and the floor
    metric_fn(real) on n rows of `real_pool` drawn without replacement by that seed. `real_pool`
    should be disjoint from the reference that `metric_fn` compares against. Returns, per metric
    name, {"mean", "std", "floor_mean", "floor_std", "above_floor" = mean - floor_mean}; std is
    the sample std over seeds (0 for one seed). `floor`: `floor_metrics(...)` computed earlier
    for the same metric_fn, real_pool, n and seeds (computed here if None).
    """
    seeds = list(seeds)
    real = floor if floor is not None else floor_metrics(metric_fn, real_pool, n, seeds)
    gen = []
    for seed in seeds:
        samples = samples_fn(seed)
        if len(samples) != n:
            raise ValueError(f"samples_fn({seed}) returned {len(samples)} samples, expected n = {n}")
        gen.append(metric_fn(samples))

    def stats(values):
        v = np.asarray(values, dtype=np.float64)
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

    out = {}
    for name in gen[0]:
        mean, std = stats([g[name] for g in gen])
        floor_mean, floor_std = stats([r[name] for r in real])
        out[name] = {"mean": mean, "std": std, "floor_mean": floor_mean, "floor_std": floor_std,
                     "above_floor": mean - floor_mean}
    return out
