"""Tests for fastgen_core.metrics."""
import math

import pytest
import torch

from fastgen_core.config import DataConfig
from fastgen_core.data import load_data
from fastgen_core.metrics import (frechet_distance, nearest_neighbour_distance, sliced_wasserstein, toy_metrics,
                                  with_floor)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

#----------------------------------------------------------------------------
# Sliced Wasserstein.


def test_swd_zero_for_identical_and_equals_1d_shift():
    a = randn(3000, 1)
    assert sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(a, a[torch.randperm(3000)]) == pytest.approx(0.0, abs=1e-12)
    for shift in [0.1, 0.5, 2.0]:
        assert sliced_wasserstein(a, a + shift) == pytest.approx(shift, rel=1e-6)


def test_swd_2d_shift_and_unequal_sizes():
    a = randn(1000, 2)
    d = torch.tensor([0.6, -0.8])  # |d| = 1; mean of (theta . d)^2 over directions = |d|^2 / 2
    assert sliced_wasserstein(a, a + d, n_proj=2048) == pytest.approx(1 / math.sqrt(2), rel=0.05)
    same = sliced_wasserstein(randn(2000, 2, seed=1), randn(1000, 2, seed=2))
    shifted = sliced_wasserstein(randn(2000, 2, seed=1), randn(1000, 2, seed=2) + d)
    assert same < 0.1 and shifted == pytest.approx(1 / math.sqrt(2), abs=0.1)
    assert sliced_wasserstein(a, a + d, seed=1) != sliced_wasserstein(a, a + d, seed=2)

#----------------------------------------------------------------------------
# Frechet distance.


def test_frechet_closed_form_diagonal_gaussians():
    mu1, s1 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 2.0, 0.5])
    mu2, s2 = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([1.5, 1.0, 0.5])
    f1, f2 = mu1 + s1 * randn(200000, 3, seed=1), mu2 + s2 * randn(200000, 3, seed=2)
    exact = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()  # diagonal case: sum (s1 - s2)^2
    assert frechet_distance(f1, f2) == pytest.approx(exact.item(), abs=0.03)


def test_frechet_identical_and_nonnegative():
    f = randn(500, 16)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(f, f) >= 0
    assert frechet_distance(f, f + 1) == pytest.approx(16.0, rel=1e-6)  # pure mean shift
    # f vs 2f: |mu|^2 + tr(S + 4S - 2 (4 S^2)^1/2) = |mu|^2 + tr(S)
    mu, cov = f.double().mean(0), torch.cov(f.T.double())
    assert frechet_distance(f, 2 * f) == pytest.approx((mu.square().sum() + cov.trace()).item(), rel=1e-6)

#----------------------------------------------------------------------------
# Toy metrics.


def test_toy_metrics_true_samples():
    ds = load_data(DataConfig(name="8gaussians", n_train=4000, n_test=4000))
    m = toy_metrics(ds.x, ds.density, ds.x_test)
    assert set(m) == {"swd", "nll", "mode_coverage", "off_support", "mode_recall", "nn_dist"}
    assert all(type(v) is float and math.isfinite(v) for v in m.values())
    assert m["mode_coverage"] == 1.0 and m["off_support"] < 0.02 and m["swd"] < 0.05 and m["mode_recall"] > 0.97
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 0.05 ** 2)  # well-separated equal mixture
    assert m["nll"] == pytest.approx(entropy, abs=0.05)


@pytest.mark.parametrize("name", ["checkerboard", "labelled_mixture", "fractal"])
def test_toy_metrics_other_toys(name):
    ds = load_data(DataConfig(name=name, n_train=4000, n_test=4000))
    m = toy_metrics(ds.x, ds.density, ds.x_test)
    assert m["mode_coverage"] == 1.0 and m["off_support"] < 0.02 and m["swd"] < 0.05 and m["mode_recall"] > 0.95
    reference_nll = -ds.density.log_prob(ds.x_test).mean().item()
    assert m["nll"] == pytest.approx(reference_nll, abs=0.1)
    bad = toy_metrics(ds.x * 3 + 5, ds.density, ds.x_test)  # far away: everything off support
    assert bad["off_support"] == 1.0 and bad["mode_coverage"] == 0.0 and bad["nll"] == pytest.approx(30.0)


def test_toy_metrics_half_the_modes():
    ds = load_data(DataConfig(name="8gaussians", n_train=4000, n_test=4000))
    d = ds.density
    x, _ = d.sample(4000, torch.Generator().manual_seed(5))
    half = x[d.mode_of(x) < 4]
    m = toy_metrics(half, d, ds.x_test)
    assert m["mode_coverage"] == 0.5
    assert m["mode_recall"] == pytest.approx(0.5, abs=1e-9)  # the kept half, each at twice its weight
    assert m["swd"] > 0.2  # half the mass is missing
    # collapsed samples far off support
    off = torch.cat([x[:3000], torch.zeros(1000, 2)])
    m = toy_metrics(off, d, ds.x_test)
    assert m["off_support"] == pytest.approx(0.25, abs=0.01) and math.isfinite(m["nll"])


def test_nearest_neighbour_distance():
    b = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    a = torch.tensor([[0.0, 3.0], [9.0, 0.0], [10.0, 0.0]])
    assert nearest_neighbour_distance(a, b) == pytest.approx((3 + 1 + 0) / 3)
    assert nearest_neighbour_distance(a, b, chunk=1) == nearest_neighbour_distance(a, b)
    # precision, not coverage: samples on one mode only are as close to the data as the full set,
    # samples spread around the modes are farther
    ds = load_data(DataConfig(name="8gaussians", n_train=4000, n_test=4000))
    x, d = ds.x, ds.density
    full = toy_metrics(x, d, ds.x_test)["nn_dist"]
    assert toy_metrics(x[d.mode_of(x) == 0], d, ds.x_test)["nn_dist"] == pytest.approx(full, rel=0.2)
    assert toy_metrics(x + 0.1 * randn(*x.shape), d, ds.x_test)["nn_dist"] > 1.5 * full

#----------------------------------------------------------------------------
# Floors.


def test_with_floor():
    density = load_data(DataConfig(name="8gaussians", n_train=10, n_test=10)).density
    reference, _ = density.sample(2000, torch.Generator().manual_seed(100))
    real_pool, _ = density.sample(5000, torch.Generator().manual_seed(101))
    shift = torch.tensor([0.3, 0.0])

    def samples_fn(seed):
        return density.sample(1000, torch.Generator().manual_seed(seed))[0] + shift

    def metric_fn(x):
        return {"swd": sliced_wasserstein(x, reference, n_proj=128), "mean_x": x[:, 0].mean().item()}

    seeds = [0, 1, 2]
    out = with_floor(metric_fn, samples_fn, real_pool, n=1000, seeds=seeds)
    assert set(out) == {"swd", "mean_x"}
    for name, r in out.items():
        assert set(r) == {"mean", "std", "floor_mean", "floor_std", "above_floor"}
        assert all(type(v) is float and math.isfinite(v) for v in r.values())
        assert r["above_floor"] == pytest.approx(r["mean"] - r["floor_mean"])
    gen = [metric_fn(samples_fn(s))["swd"] for s in seeds]
    assert out["swd"]["mean"] == pytest.approx(sum(gen) / 3)
    assert out["swd"]["std"] == pytest.approx(torch.tensor(gen).std().item())
    assert 0 < out["swd"]["floor_mean"] < 0.1 < 0.15 < out["swd"]["mean"]
    assert out["swd"]["floor_std"] > 0  # different real subsets per seed
    assert out["mean_x"]["above_floor"] == pytest.approx(0.3, abs=0.03)
    single = with_floor(metric_fn, samples_fn, real_pool, n=1000, seeds=[0])
    assert single["swd"]["std"] == 0.0 and single["swd"]["mean"] == pytest.approx(gen[0])
    with pytest.raises(ValueError):
        with_floor(metric_fn, samples_fn, real_pool[:500], n=1000, seeds=[0])


def test_eval_labels_and_matched_floor_rows():
    from fastgen_core.metrics import eval_labels, matched_rows
    pool = torch.tensor([0, 0, 1, 2, 2, 2])
    a, b = eval_labels(pool, 6, seed=0), eval_labels(pool, 6, seed=1)
    assert sorted(a.tolist()) == sorted(pool.tolist()) and not torch.equal(a, b)  # same histogram, new order
    assert torch.equal(a, eval_labels(pool, 6, seed=0))
    assert torch.bincount(eval_labels(pool, 12, seed=0)).tolist() == [4, 2, 6]  # tiled
    train = torch.tensor([2, 0, 1, 1, 2, 0, 2, 2, 0])
    rows = matched_rows(train, a, seed=3)
    assert len(set(rows.tolist())) == 6 and torch.bincount(train[rows]).tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="2 rows of class 1, need 3"):
        matched_rows(train, torch.tensor([1, 1, 1]), seed=0)
