"""Tests for fastgen_core.metrics."""
import math

import numpy as np
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
    # the documented clamp to >= 0: for several of these sets the unclamped formula rounds to a tiny
    # negative number (seeds 1, 6, 8 here: about −1e-14)
    assert all(frechet_distance(g, g) >= 0 for g in (randn(500, 16, seed=s) for s in range(10)))
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

#----------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019, §2).


def brute_force_precision_recall(real, fake, k):
    """The paper's definition, transcribed with plain loops (no cdist, no sorting helpers):
    NND_k(φ) = distance from φ to its k-th nearest other point of its own set; φ is inside the
    manifold of Φ when ‖φ − φ'‖ ≤ NND_k(φ') for some φ' of Φ; precision = share of generated
    points inside the real manifold, recall = share of real points inside the generated one."""
    real, fake = real.double().tolist(), fake.double().tolist()

    def dist(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    def radii(points):
        out = []
        for i, p in enumerate(points):
            others = [dist(p, q) for j, q in enumerate(points) if j != i]
            for _ in range(k - 1):  # drop the k - 1 nearest: the smallest left is the k-th
                others.remove(min(others))
            out.append(min(others))
        return out

    def share_inside(queries, support, r):
        return sum(any(dist(q, s) <= rs for s, rs in zip(support, r)) for q in queries) / len(queries)

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


def clusters(n, centres, seed, scale=0.3):
    """n points: equal shares around each of `centres` (K, D), Gaussian with std `scale`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % len(centres)
    return centres[idx] + scale * torch.randn(n, centres.shape[1], generator=g), idx


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force_definition(k):
    from fastgen_core.metrics import precision_recall
    real, fake = randn(40, 4, seed=1), 1.5 * randn(33, 4, seed=2) + 1.0  # overlapping: values strictly in (0, 1)
    got = precision_recall(real, fake, k=k)
    want = brute_force_precision_recall(real, fake, k)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)


def test_precision_recall_matches_torch_fidelity():
    """torch-fidelity's own implementation (metric_prc; generated first, real second)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    from fastgen_core.metrics import precision_recall
    real, fake = randn(300, 16, seed=3), 1.2 * randn(250, 16, seed=4) + 0.2
    ours = precision_recall(real, fake, k=3)
    theirs = prc_features_to_metric(fake.double(), real.double(), prc_neighborhood=3, prc_batch_size=10000,
                                    save_cpu_ram=False, verbose=False)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)  # theirs: a float32 mean
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)


def test_precision_recall_identical_shifted_and_chunked():
    from fastgen_core.metrics import knn_radii, precision_recall
    f = randn(500, 8, seed=5)
    assert precision_recall(f, f) == {"precision": 1.0, "recall": 1.0}  # every point is inside its own ball
    far = precision_recall(f, f + 50.0)  # off the manifold: balls have radius ~ the spread (~3)
    assert far == {"precision": 0.0, "recall": 0.0}
    real, fake = randn(300, 8, seed=6), randn(280, 8, seed=7) * 1.3
    whole = precision_recall(real, fake, k=4, chunk=10_000)
    assert precision_recall(real, fake, k=4, chunk=7) == whole
    assert precision_recall(real, fake, k=4, chunk=7, real_radii=knn_radii(real, 4, chunk=13)) == whole
    with pytest.raises(ValueError, match="1 <= k < 3"):
        knn_radii(randn(3, 2), k=3)


def test_precision_recall_half_the_modes():
    """A generator that covers 5 of 10 well-separated modes: recall halves, precision stays."""
    from fastgen_core.metrics import precision_recall
    centres = 10.0 * randn(10, 2, seed=8)
    real, real_mode = clusters(1000, centres, seed=9)
    # exact subset: every generated point is a real one (precision 1), and the real points of the
    # kept modes are inside the generated manifold at distance 0, the others far from it
    kept = real[real_mode < 5]
    assert precision_recall(real, kept) == {"precision": 1.0, "recall": 0.5}
    # fresh draws: the same against a fresh draw of all modes (the floor), recall at half of it
    full, _ = clusters(1000, centres, seed=10)
    half, _ = clusters(1000, centres[:5], seed=11)
    floor, got = precision_recall(real, full), precision_recall(real, half)
    assert floor["precision"] > 0.9 and floor["recall"] > 0.9
    assert got["precision"] == pytest.approx(floor["precision"], abs=0.03)
    assert got["recall"] == pytest.approx(floor["recall"] / 2, abs=0.03)

#----------------------------------------------------------------------------
# Standard Inception FID through torch-fidelity (its weights are never downloaded).


def test_frechet_distance_agrees_with_torch_fidelity_fid():
    """Our eigen-form Fréchet distance against torch-fidelity's FID from statistics (TTUR's formula:
    tr sqrtm via the eigenvalues of Σ1·Σ2), on random features of two different distributions."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from fastgen_core.metrics import inception_fid
    f1 = randn(800, 24, seed=12) @ randn(24, 24, seed=13) / 4
    f2 = randn(600, 24, seed=14) * torch.linspace(0.5, 2.0, 24) + 0.3
    theirs = fid_statistics_to_metric(fid_features_to_statistics(f1.double()), fid_features_to_statistics(f2.double()),
                                      verbose=False)["frechet_inception_distance"]
    assert theirs > 1
    assert frechet_distance(f1, f2) == pytest.approx(theirs, rel=1e-8)
    assert inception_fid(f1, f2) == pytest.approx(theirs, rel=1e-4)  # float32 features, as torch-fidelity has them


def test_inception_weights_path_never_downloads(monkeypatch, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from fastgen_core.metrics import INCEPTION_ENV, inception_weights_path
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    default = inception_weights_path()
    # torch-fidelity's download location: torch.hub's checkpoint cache, its URL's file name
    assert default == tmp_path / "th" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert URL_INCEPTION_V3.endswith("/" + default.name)  # the file torch.hub's load_state_dict_from_url would write
    assert not (tmp_path / "th").exists()  # only a path: nothing fetched, nothing created
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "env.pth"))
    assert inception_weights_path() == tmp_path / "env.pth"
    assert inception_weights_path(str(tmp_path / "setting.pth")) == tmp_path / "setting.pth"  # the setting wins


def test_inception_features_load_the_given_file_and_see_grey_as_rgb(monkeypatch, tmp_path):
    """The present path without the real weights: torch-fidelity's Inception-v3 with its random
    initialisation (its load_state_dict patched to record what it is given), fed through our uint8
    conversion: a grey image and the same image as RGB give the same 2048-d features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from fastgen_core.metrics import InceptionFeatures
    loaded = []
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: loaded.append(sd))
    torch.save({"marker": torch.ones(1)}, tmp_path / "w.pth")
    net = InceptionFeatures(tmp_path / "w.pth")
    assert [list(d) for d in loaded] == [["marker"]]  # the file we named, not a download
    grey = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = net(torch.cat([grey.repeat(1, 3, 1, 1), grey.repeat(1, 3, 1, 1)]))
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert torch.equal(net(grey), f[:1])


def test_to_uint8_rgb():
    from fastgen_core.metrics import to_uint8_rgb
    grey = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5]).reshape(1, 1, 1, 5)
    u = to_uint8_rgb(grey)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 1, 5)
    assert u[0, :, 0].tolist() == [[0, 64, 128, 255, 255]] * 3  # (x + 1)/2·255 rounded, clamped; grey repeated
    rgb = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(to_uint8_rgb(rgb)[:, 1], to_uint8_rgb(rgb[:, 1:2])[:, 0])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_uint8_rgb(torch.zeros(1, 2, 4, 4))

#----------------------------------------------------------------------------
# The evaluate stage on digits: precision/recall beside FD, Inception FID absent.

DIGITS = {
    "name": "digits_metrics",
    "seed": 0,
    "data": {"kind": "digits", "conditional": True},
    "stages": {
        "features": {"kind": "feature_net", "method": {"name": "classifier", "width": 16},
                     "train": {"steps": 40, "batch_size": 64, "lr": 2.0e-3}},
        "teacher": {"kind": "teacher", "method": {"name": "edm"},
                    "network": {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16},
                    "train": {"steps": 40, "batch_size": 64, "lr": 2.0e-3}},
        "eval": {"kind": "evaluate", "inputs": {"models": ["teacher"], "features": "features"},
                 "evaluate": {"n_samples": 64, "seeds": [0, 1], "teacher_nfe": [1, 3], "plots": True,
                              "inception_fid": "auto"}},
    },
    "tracking": {"enabled": False},
    "compute": {"threads": 1},
}


def test_evaluate_reports_precision_recall_and_records_inception_skip(tmp_path, monkeypatch):
    import json

    import yaml

    from stages.recipe import load_recipe
    from stages.report import report
    from stages.runtime import run_stage, stage_dir
    from stages.spec import StageError

    monkeypatch.delenv("FASTGEN_INCEPTION_WEIGHTS", raising=False)
    missing = tmp_path / "no-such-weights.pth"

    def recipe(**ev):
        raw = json.loads(json.dumps(DIGITS))
        raw["stages"]["eval"]["evaluate"].update(ev)
        raw["storage"] = {"root": str(tmp_path / "outputs")}
        path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(path)

    auto = recipe(inception_weights=str(missing))
    for stage in ("features", "teacher"):
        run_stage(auto, stage)
    manifest = run_stage(auto, "eval")
    status = manifest["metrics"]["inception_fid_status"]
    assert status.startswith("skipped: no Inception-v3 weights file at " + str(missing))
    out = stage_dir(load_recipe(auto), "eval")
    results = json.loads((out / "metrics.json").read_text())
    # precision/recall recomputed from the saved samples with the brute-force definition above: the
    # samples in the feature net's features against the n = 64 test images of the real manifold (a
    # fixed subset, permutation seed 50000), k = 3 (evaluate.pr_k's default); mean and sample std over
    # the two seeds
    from fastgen_core.data import cached_data
    from fastgen_core.models import load_model

    fnet = load_model(stage_dir(load_recipe(auto), "features")).nets["net"]
    with torch.no_grad():
        ref = fnet.features(cached_data(load_recipe(auto).data).x_test)
        pr_ref = ref[torch.randperm(len(ref), generator=torch.Generator().manual_seed(50_000))[:64]]
    for nfe in ("nfe_1", "nfe_3"):
        m = results["teacher"][nfe]
        assert set(m) == {"fd", "precision", "recall"}  # no inception_fid, the rest as always
        with np.load(out / "samples" / f"teacher_{nfe.replace('_', '')}.npz") as z, torch.no_grad():
            per_seed = [brute_force_precision_recall(pr_ref, fnet.features(torch.from_numpy(z[f"seed{s}"])), 3)
                        for s in (0, 1)]
        for i, name in enumerate(("precision", "recall")):
            s, v = m[name], [p[i] for p in per_seed]
            assert s["mean"] == pytest.approx(sum(v) / 2, abs=2e-6), (nfe, name)
            assert s["std"] == pytest.approx(abs(v[0] - v[1]) / math.sqrt(2), abs=2e-6), (nfe, name)  # ddof = 1
            assert 0 < s["floor_mean"] <= 1
            assert s["above_floor"] == pytest.approx(s["mean"] - s["floor_mean"], abs=2e-6)
    assert (out / "plots" / "precision_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `fastgen report`: P / R beside FD with their floors, the skip in the title, the summary keys
    text, md, flat = report(load_recipe(auto), "eval")
    t35 = results["teacher"]["nfe_3"]
    row = next(line for line in text.splitlines() if line.startswith("teacher") and line.split()[1] == "3")
    assert f"{t35['precision']['mean']:.2g} / {t35['recall']['mean']:.2g}" in row
    assert f"{t35['precision']['floor_mean']:.2g} / {t35['recall']['floor_mean']:.2g}" in row
    assert "Inception FID: skipped: no Inception-v3 weights file" in text and "| P / R | floor P / R |" in md
    assert flat["teacher_precision"] == pytest.approx(t35["precision"]["mean"], rel=1e-3)
    assert flat["floor_recall"] == pytest.approx(t35["recall"]["floor_mean"], rel=1e-3)
    # off: the same numbers, and the status says so
    off = run_stage(recipe(inception_fid=False), "eval")
    assert off["metrics"]["inception_fid_status"].startswith("off")
    assert {k: v for k, v in off["metrics"].items() if k != "inception_fid_status"} == \
        {k: v for k, v in manifest["metrics"].items() if k != "inception_fid_status"}
    # required: one line naming the file, the field and the path looked at
    with pytest.raises(StageError) as e:
        run_stage(recipe(inception_fid=True, inception_weights=str(missing)), "eval")
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("they are never downloaded at run time)")
    assert ".yaml: stages.eval.evaluate.inception_fid: true, but no Inception-v3 weights file at " + str(missing) in msg
