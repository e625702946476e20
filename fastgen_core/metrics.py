"""Sample-quality metrics: sliced Wasserstein, toy-density metrics, Frechet distance, k-NN
precision and recall, standard Inception FID (torch-fidelity, never downloading its weights), and
a helper that reports any metric next to its real-data floor."""
from __future__ import annotations

import os
from pathlib import Path
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


def nearest_neighbour_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    """Mean over the rows of a (N, D) of the Euclidean distance to the nearest row of b (M, D)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(torch.cat([torch.cdist(a[i:i + chunk], b).min(dim=1).values for i in range(0, len(a), chunk)]).mean())


def toy_metrics(samples: torch.Tensor, density: ToyDensity, reference: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Metrics of 2D samples against a known toy density.

    swd:           sliced W2 to `reference` (held-out true samples).
    nll:           mean -log p(x) under the true density, log p clipped at -30 (lower is better).
    mode_coverage: fraction of the K modes (mixture components / checkerboard squares) that are
                   covered; mode k is covered when at least N / (4K) of the N samples are on
                   support and assigned to k by `density.mode_of`.
    off_support:   fraction of samples not on support (`density.on_support`).
    nn_dist:       distance to the data: mean Euclidean distance from a sample to its nearest
                   neighbour among `reference` (a precision-type measure: it falls when samples
                   concentrate on the data, whatever the coverage; sliced W2 measures both).
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
        "nn_dist": nearest_neighbour_distance(samples, reference),
        "mode_recall": mode_recall(counts, density.weights),
    }


def mode_recall(counts: torch.Tensor, weights: torch.Tensor) -> float:
    """sum_k min(p_k, pi_k) for on-support sample counts per mode (p = counts / total) and the true
    weights pi: `toy_metrics`' mode_recall. Both sum to 1, so 1 − mode_recall is the total variation
    ½ sum_k |p_k − pi_k| between the samples' split over the modes and the true one."""
    return float(torch.minimum(counts.double() / max(int(counts.sum()), 1), weights).sum())


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


#----------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
# for Assessing Generative Models", §2: eq. 1 the manifold indicator f, eq. 2 precision and
# recall): each feature set spans a manifold, the union of balls around its points, each ball's
# radius the distance to the point's k-th nearest neighbour in its own set. precision = share of
# generated points inside the real manifold (fidelity), recall = share of real points inside the
# generated manifold (diversity).

def knn_radii(f: torch.Tensor, k: int = 3, chunk: int = 1024, device=None) -> torch.Tensor:
    """NND_k(φ) of every row φ of f (N, F): the distance to its k-th nearest neighbour among the
    other rows (the k + 1-th smallest distance counting φ itself, at 0), computed `chunk` rows at
    a time in float64 on `device` (default: f's), returned on the CPU."""
    f = f.double().flatten(1).to(device)
    if not 1 <= k < len(f):
        raise ValueError(f"k = {k} nearest neighbours need 1 <= k < {len(f)} (the number of points)")
    return torch.cat([torch.cdist(f[i:i + chunk], f).kthvalue(k + 1, dim=1).values.cpu()
                      for i in range(0, len(f), chunk)])


def in_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024,
                device=None) -> torch.Tensor:
    """f(φ, Φ) of eq. 1 for every row φ of `query`: True when ‖φ − φ'‖ ≤ radii[φ'] for some row
    φ' of `support`."""
    q, s, r = (t.double().flatten(1).to(device) for t in (query, support, radii[None]))
    return torch.cat([(torch.cdist(q[i:i + chunk], s) <= r).any(dim=1).cpu() for i in range(0, len(q), chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024,
                     real_radii: torch.Tensor | None = None, device=None) -> dict[str, float]:
    """Improved precision and recall (eq. 2) of generated features `fake` against real features
    `real`, k-NN manifolds with k neighbours. `real_radii`: `knn_radii(real, k)` computed earlier
    (the real set is the same for every model of an evaluation)."""
    radii_r = knn_radii(real, k, chunk, device) if real_radii is None else real_radii
    radii_f = knn_radii(fake, k, chunk, device)
    return {"precision": float(in_manifold(fake, real, radii_r, chunk, device).double().mean()),
            "recall": float(in_manifold(real, fake, radii_f, chunk, device).double().mean())}

#----------------------------------------------------------------------------
# Standard Inception FID (Heusel et al. 2017) through torch-fidelity: its Inception-v3 port of the
# TF-slim graph, 2048-d pool features of uint8 RGB images resized to 299×299 inside the network,
# and its statistics → FID formula. The weights are never downloaded here.

INCEPTION_ENV = "FASTGEN_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the file name of torch-fidelity's URL_INCEPTION_V3


def inception_weights_path(setting: str | None = None) -> Path:
    """Where the Inception-v3 weights are looked for: `setting`, else $FASTGEN_INCEPTION_WEIGHTS,
    else the file torch-fidelity itself would download to (torch.hub's checkpoint cache:
    <torch.hub.get_dir()>/checkpoints/INCEPTION_FILE, i.e. under $TORCH_HOME or ~/.cache/torch/hub).
    Only a path: nothing is downloaded or opened, and torch-fidelity (slow to import) is not imported."""
    if setting or os.environ.get(INCEPTION_ENV):
        return Path(setting or os.environ[INCEPTION_ENV]).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) as uint8 RGB (N, 3, H, W) at their resolution, the input
    torch-fidelity's Inception expects: round((x + 1)/2 · 255), one grey channel repeated."""
    u = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if u.shape[1] == 1:
        u = u.repeat(1, 3, 1, 1)
    if u.shape[1] != 3:
        raise ValueError(f"Inception FID needs 1 or 3 channels, got images of shape {tuple(x.shape)}")
    return u


class InceptionFeatures:
    """torch-fidelity's Inception-v3 ("inception-v3-compat", 2048-d pool features) loaded from a
    local weights file: x in [-1, 1] (N, C, H, W) → (N, 2048) float32 features."""

    def __init__(self, weights, device="cpu", batch: int = 100):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights)).to(device)
        self.device, self.batch = device, batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(to_uint8_rgb(b).to(self.device))[0].float().cpu() for b in x.split(self.batch)])


def inception_fid(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID from two sets of Inception features with torch-fidelity's own statistics and formula
    (`fid_features_to_statistics`, `fid_statistics_to_metric`), so that the number is the one
    `torch_fidelity.calculate_metrics(fid=True)` reports for the same features."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    s1, s2 = fid_features_to_statistics(f1.float()), fid_features_to_statistics(f2.float())
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])

#----------------------------------------------------------------------------


def eval_labels(labels_pool: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The n class labels a conditional generator gets for one seed: the pool, tiled to n rows
    if needed, in a random order fixed by `seed`. With n = len(pool) the generated set has exactly
    the reference's class histogram: drawing labels with replacement instead adds a random class
    imbalance to every Frechet distance (measured on digits: teacher FD 0.38 ± 0.13 over seeds
    with random labels, 0.17 ± 0.02 with matched ones)."""
    reps = -(-n // len(labels_pool))
    tiled = labels_pool.repeat(reps)
    return tiled[torch.randperm(len(tiled), generator=torch.Generator().manual_seed(30_000 + seed))[:n]]


def matched_rows(pool_labels: torch.Tensor, target_labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices of rows of a labelled pool, drawn without replacement by `seed`, with the same class
    histogram as `target_labels` (the floor of a class-conditional evaluation)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c, k in zip(*torch.unique(target_labels, return_counts=True)):
        rows = (pool_labels == c).nonzero().flatten()
        if len(rows) < k:
            raise ValueError(f"the real pool has {len(rows)} rows of class {int(c)}, need {int(k)}")
        picks.append(rows[torch.randperm(len(rows), generator=g)[:k]])
    return torch.cat(picks)


def floor_metrics(metric_fn: Callable[[torch.Tensor], dict[str, float]], real_pool: torch.Tensor, n: int,
                  seeds, pool_labels: torch.Tensor | None = None,
                  target_labels: dict[int, torch.Tensor] | None = None) -> list[dict[str, float]]:
    """The floor, per seed: metric_fn on n rows of `real_pool` drawn without replacement by that
    seed, with the class histogram of `target_labels[seed]` when labels are given (the labels
    the generators got for that seed). It depends on nothing generated: compute it once per
    evaluation and pass it on."""
    if len(real_pool) < n:
        raise ValueError(f"real_pool has {len(real_pool)} rows, need at least n = {n}")
    if target_labels is not None:
        picks = (matched_rows(pool_labels, target_labels[s], s) for s in seeds)
    else:
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


def value_histogram_distance(samples: torch.Tensor, reference: torch.Tensor, levels: int) -> float:
    """Distance between the value histograms of two image sets in [−1, 1] (discrete data,
    docs/methods.md §7): every value of both is quantised to `levels` uniform levels
    (v = round((x + 1)/2·(levels − 1))), and the result is the total variation ½·Σ_v |p(v) − q(v)|
    between the two histograms over all pixels and channels (0: the same histogram, 1: disjoint)."""
    def hist(x):
        v = torch.round((x.double().flatten() + 1) / 2 * (levels - 1)).clamp(0, levels - 1).long()
        return torch.bincount(v, minlength=levels).double() / v.numel()
    return float((hist(samples) - hist(reference)).abs().sum() / 2)


#----------------------------------------------------------------------------
# Deterministic noise → data maps (docs/methods.md §2, §13): coupling preservation, inversion,
# straightness. Distances are squared Euclidean per sample (all dimensions summed), averaged.

def mean_sq_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """E_n ‖a_n − b_n‖²: coupling preservation (a model's sample from a pair's noise against the
    pair's sample) and inversion error (data against data → noise → data)."""
    return float((a.double() - b.double()).flatten(1).square().sum(1).mean())


def straightness(path: torch.Tensor) -> float:
    """Rectified flow's straightness S(Z) = ∫₀¹ E‖(Z1 − Z0) − Ż_t‖² dt (Liu et al. 2023) of
    sampled paths `path` (N + 1, n, ...) on a uniform time grid t_i = i/N: Ż is piecewise constant,
    (x_{i+1} − x_i)·N on [t_i, t_{i+1}], so S = (1/N)·Σ_i E‖(x_N − x_0) − N·(x_{i+1} − x_i)‖².
    0 exactly when every path moves on a straight line at constant speed."""
    p = path.double().flatten(2)
    N = p.shape[0] - 1
    chord = p[-1] - p[0]
    seg = (p[1:] - p[:-1]) * N
    return float((chord - seg).square().sum(-1).mean(-1).mean())
