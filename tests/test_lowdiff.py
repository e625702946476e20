"""LowDiff, our one-model resolution cascade (docs/methods.md §11): the sampler at full resolution only
is the plain EDM sampler of the same network; the pyramid's down/up-sampling in closed form; the
cascade feeds each level the finished lower level (zeros at the lowest) and keeps each level on
its own resolution; the training levels; the recipe and the settings validate."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fastgen_core.config import NetworkConfig
from fastgen_core.data import Dataset
from fastgen_core.methods import edm
from fastgen_core.methods import lowdiff as L
from fastgen_core.methods.base import Context
from fastgen_core.models import LoadedModel, load_model, save_model
from fastgen_core.noise import EDM, EDMDenoiser

ROOT = Path(__file__).resolve().parents[1]
NET = NetworkConfig(arch="mlp", width=32, depth=1, emb_dim=16)


def _data(n=64, classes=10):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(classes, (n,), generator=g)
    return Dataset(x, y, x[:16], y[:16], classes, None)


def _method(data=None, **cfg):
    return L.Method(L.Config(**cfg), Context(data or _data(), EDM(), NET, {}, torch.device("cpu"), 0, 4))


def _saved(m, data) -> LoadedModel:
    with torch.no_grad():  # a non-trivial network (a fresh one outputs exactly zero)
        for i, p in enumerate(m.nets["net"].parameters()):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    with tempfile.TemporaryDirectory() as d:
        save_model(d, "lowdiff", m.cfg, m.net_cfgs, {"net": m.nets["net"].state_dict()}, data.shape,
                   data.num_classes, m.ctx.noise, m.meta())
        return load_model(d)


class FullResolution(nn.Module):
    """The LowDiff network as a plain single-resolution teacher network: w = log₂ 8, no lower level."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, class_labels=None):
        return self.net(x, t, class_labels=class_labels, w=3.0)


def test_full_resolution_only_is_the_teachers_sampler():
    data = _data()
    lm = _saved(_method(data), data)
    teacher = LoadedModel({"method": "edm", "num_classes": 10, "shape": [1, 8, 8]},
                          nn.ModuleDict({"net": FullResolution(lm.nets["net"])}), lm.noise)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6)
    for nfe in (1, 2, 5, 9):
        mine = L.sample(lm, z, nfe, y, cascade=False)
        assert torch.equal(mine, edm.sample(teacher, z, nfe, y)), nfe
    torch.manual_seed(0)
    assert not torch.allclose(L.sample(lm, z, 5, y), mine)  # the cascade is another sampler


def _blocks(x, f):
    """Closed form of f×f average pooling: the mean of each block, by explicit slicing."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, h // f, w // f, dtype=x.dtype)
    for i in range(h // f):
        for j in range(w // f):
            out[:, :, i, j] = x[:, :, i * f:(i + 1) * f, j * f:(j + 1) * f].mean((-2, -1))
    return out


@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_pyramid_down_up_closed_form(f):
    g = torch.Generator().manual_seed(f)
    x = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    low = torch.randn(3, 2, 8 // f, 8 // f, generator=g, dtype=torch.float64)
    assert torch.allclose(L.down(x, f), _blocks(x, f), atol=1e-12)
    upl = L.up(low, f)
    assert upl.shape == x.shape and torch.equal(upl[:, :, f * 1 - 1 if f > 1 else 0, 0], low[:, :, 0 if f > 1 else 0, 0])
    assert torch.allclose(L.down(upl, f), low, atol=1e-12)          # down ∘ up = identity
    P = L.project(x, f)
    assert torch.allclose(L.project(P, f), P, atol=1e-12)           # a projection …
    y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert torch.allclose((P * y).sum(), (x * L.project(y, f)).sum())  # … orthogonal
    if f < 8:                                                        # coarser levels of a finer one
        assert torch.allclose(L.project(P, 2 * f), L.project(x, 2 * f), atol=1e-12)
    v = x.flatten(1)                                                 # vectors: runs of f entries
    assert torch.allclose(L.down(v, f), v.reshape(3, -1, f).mean(-1)) and torch.allclose(L.down(L.up(v, f), f), v)


class Recorder(nn.Module):
    """A network with a known output that records what each call receives."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels=None, w=None, cond=None):
        self.calls.append({"x": x.clone(), "t": t.clone(), "w": w.clone(), "cond": None if cond is None else cond.clone()})
        c = torch.zeros_like(x) if cond is None else cond
        return torch.tanh(x) + 0.5 * c + 0.1 * w[:, None, None, None]


def test_cascade_feeds_each_level_the_finished_lower_level():
    noise, res, nfes = EDM(), [2, 4, 8], [3, 5, 3]
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    rec = Recorder()
    D = EDMDenoiser(rec, noise)
    torch.manual_seed(7)
    out = L.cascade_sample(D, z, noise, res, nfes)
    by_level = [[c for c in rec.calls if float(c["w"][0]) == math.log2(r)] for r in res]
    assert [len(c) for c in by_level] == nfes and len(rec.calls) == sum(nfes)
    # level 0: its condition is zeros (None: the network's zero channels)
    assert all(c["cond"] is None for c in by_level[0])
    for k in (1, 2):
        rec_k = Recorder()
        torch.manual_seed(7)   # the same lower-level noise draws
        lower = L.cascade_sample(EDMDenoiser(rec_k, noise), z, noise, res[:k], nfes[:k])
        f_low = 8 // res[k - 1]
        assert torch.allclose(L.project(lower, f_low), lower, atol=1e-6)  # the finished level r_{k−1}, upsampled
        for c in by_level[k]:
            assert torch.equal(c["cond"], lower)
    # every level's path stays on its own resolution
    for r, calls in zip(res, by_level):
        for c in calls:
            assert torch.allclose(L.project(c["x"], 8 // r), c["x"], atol=1e-5)
    # the full-resolution level starts from c + σ_max·z (the network sees c_in·x)
    first = by_level[2][0]
    c_in = 1 / math.sqrt(noise.sigma_max**2 + noise.sigma_data**2)
    assert torch.allclose(first["x"] / c_in, by_level[2][0]["cond"] + noise.sigma_max * z, atol=1e-4)
    # refine_sigma_max: levels k ≥ 1 start from c + σ_ref·ε^(k) on a grid from σ_ref
    rec2 = Recorder()
    torch.manual_seed(7)
    L.cascade_sample(EDMDenoiser(rec2, noise), z, noise, res, nfes, refine_sigma_max=2.0)
    first = [c for c in rec2.calls if float(c["w"][0]) == 3.0][0]
    assert torch.allclose(first["t"], torch.full((4,), math.log(2.0) / 4))          # c_noise(σ_ref)
    assert torch.allclose(first["x"] * math.sqrt(4 + noise.sigma_data**2), first["cond"] + 2.0 * z, atol=1e-5)


def test_training_levels_are_the_projected_data_and_block_noise():
    m = _method()
    x0 = torch.randn(3000, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for k, f in enumerate((4, 2, 1)):
        torch.manual_seed(k)
        x_k, c_k, e_k, w = m.level_batch(x0, torch.full((3000,), k))
        assert torch.allclose(x_k, _blocks(x0, f).repeat_interleave(f, -2).repeat_interleave(f, -1), atol=1e-6)
        want_c = torch.zeros_like(x0) if k == 0 else _blocks(x0, 2 * f).repeat_interleave(2 * f, -2).repeat_interleave(2 * f, -1)
        assert torch.allclose(c_k, want_c, atol=1e-6)
        assert torch.allclose(L.project(e_k, f), e_k, atol=1e-6)       # the noise lives on the level …
        assert abs(float(e_k.var()) - 1) < 0.05                        # … unit variance per pixel
        assert torch.all(w == math.log2(8 // f))
    # the loss's value, EDM's preconditioning and weighting written out (docs/methods.md §0, §11):
    # L = mean_i λ(σ_i)·mean‖P_{f_i}(c_skip·x_i + c_out·F(c_in·x_i, ¼·ln σ_i; w_i, c_i)) − x0_i^(k)‖² with
    # x_i = x0_i^(k) + σ_i·ε_i^(k), c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²),
    # λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; levels, conditions and level noise from the block means; the draws (level
    # k, noise ε, ln σ ~ N(−1.2, 1.2²)) replayed from the same seed in the method's order. A fresh network
    # outputs zero (zero-initialised output layer): F = 0, a closed form of the draws; a perturbed one: F is
    # its raw output on the inputs above.
    n, sd, y = 64, 0.5, torch.arange(64) % 10

    def expected(seed: int, net=None) -> float:
        torch.manual_seed(seed)
        k, eps, ln_s = torch.randint(3, (n,)), torch.randn(n, 1, 8, 8), -1.2 + 1.2 * torch.randn(n)
        assert len(set(k.tolist())) == 3  # every level in the batch
        fs = [(4, 2, 1)[int(j)] for j in k]

        def lv(v, mult=1):  # sample i held at block side mult·f_i
            return torch.cat([_blocks(v[i:i + 1], mult * f).repeat_interleave(mult * f, -2)
                              .repeat_interleave(mult * f, -1) for i, f in enumerate(fs)])
        x, c = lv(x0), lv(x0, 2) * (torch.tensor(fs) < 4)[:, None, None, None]       # zeros at level 0
        e = lv(eps) * torch.tensor(fs, dtype=torch.float)[:, None, None, None]        # ε^(k) = f·P_f ε
        s = ln_s.exp()[:, None, None, None]
        xn = x + s * e
        F = 0.0
        if net is not None:
            with torch.no_grad():
                F = net(xn / (s**2 + sd**2).sqrt(), ln_s / 4, class_labels=y,
                        w=torch.tensor([math.log2(8 // f) for f in fs]), cond=c)
        D = lv(sd**2 / (s**2 + sd**2) * xn + s * sd / (s**2 + sd**2).sqrt() * F)
        lam = ((s**2 + sd**2) / (s * sd) ** 2).flatten()
        return float((lam * ((D - x) ** 2).flatten(1).mean(1)).mean())

    torch.manual_seed(11)
    fresh, _ = m.loss("net", {"x": x0[:n], "y": y}, 0)
    assert fresh.item() == pytest.approx(expected(11), rel=1e-5)
    with torch.no_grad():
        for i, p in enumerate(m.nets["net"].parameters()):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    torch.manual_seed(11)
    perturbed, _ = m.loss("net", {"x": x0[:n], "y": y}, 0)
    assert perturbed.item() == pytest.approx(expected(11, m.nets["net"]), rel=1e-5)
    assert abs(perturbed.item() / fresh.item() - 1) > 0.05  # the network's output counts


def test_settings_and_recipe_validate():
    with pytest.raises(ValidationError, match="resolutions"):
        L.Config(resolutions=[2, 3, 8], low_nfe=[1, 1])
    with pytest.raises(ValidationError, match="low_nfe"):
        L.Config(resolutions=[2, 4, 8], low_nfe=[5])
    with pytest.raises(ValidationError, match="low_nfe"):
        L.Config(resolutions=[4, 8], low_nfe=[4])
    with pytest.raises(ValueError, match="resolutions"):
        _method(resolutions=[2, 4], low_nfe=[3])
    assert L.pyramid(L.Config(), (1, 8, 8)) == ([2, 4, 8], [35, 17])      # the defaults
    assert L.pyramid(L.Config(), (2,)) == ([1, 2], [35]) and L.pyramid(L.Config(), (3, 5, 5)) == ([5], [])
    with pytest.raises(ValidationError, match="low_nfe"):
        L.Config(low_nfe=[3])
    with pytest.raises(ValueError, match="cond_channels"):
        L.Method(L.Config(), Context(_data(), EDM(), NET.model_copy(update={"cond_channels": 1}), {}))
    from stages.recipe import load_recipe

    r = load_recipe(ROOT / "params" / "digits_lowdiff.yaml")
    assert r.model_method("lowdiff") == "lowdiff" and r.model_method("teacher") == "edm"
    assert r.stages["lowdiff"].network == r.stages["teacher"].network   # the same network size
    assert r.stages["lowdiff"].method.resolutions[-1] == 8
