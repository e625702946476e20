"""Constant Acceleration Flow (fastgen_core/methods/caf.py, docs/methods.md §2).

Closed forms on an affine coupling x1 = T(x0) = A·x0 + b: the exact initial velocity
v0 = h·(T(x0) − x0) and the paper's acceleration a = 2(x1 − x0) − 2·v0 are written here as
networks that recover x0 from (x_t, t[, v]) by solving the CAF interpolant for it. With them the
sampler lands on x1 for any N, inversion returns x0, and the path is the interpolant at every
t_i; the training losses vanish on them and not on a velocity-mismatched acceleration.
The process conversions of `caf` (round trip, denoiser against EDM's at matched noise on Gaussian
data) are in tests/test_noise.py. Recipe validation: one line per problem."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fastgen_core.config import DataConfig, NetworkConfig
from fastgen_core.data import load_data
from fastgen_core.methods import caf
from fastgen_core.methods.base import Context
from fastgen_core.models import LoadedModel
from fastgen_core.noise import CAF
from stages.recipe import RecipeError, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
A = torch.tensor([0.5, -1.7], dtype=torch.float64)  # a coupling that flips and stretches one axis
B = torch.tensor([1.0, -0.3], dtype=torch.float64)


def T(x0):
    return x0 * A + B


class ExactVelocity(nn.Module):
    """v0(x_t, t) of the coupling T: x_t = (1 − κ)·x0 + κ·T(x0) with κ = t² + h(t − t²) (the
    interpolant with the true v0), solved for x0; then v0 = h·(T(x0) − x0)."""

    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward(self, x, t, cond=None, class_labels=None):
        t = t.to(x.dtype)[:, None]
        k = t * t + self.h * (t - t * t)
        x0 = (x - k * B) / ((1 - k) + k * A)
        return self.h * (T(x0) - x0)


class ExactAcceleration(nn.Module):
    """a(x_t, t, v) of the coupling T: x_t = (1 − t²)·x0 + t²·T(x0) + v·(t − t²) solved for x0;
    then a = 2(T(x0) − x0) − 2v (the paper's formula, for whatever initial velocity v is given)."""

    def forward(self, x, t, cond=None, class_labels=None):
        t = t.to(x.dtype)[:, None]
        x0 = (x - t * t * B - cond * (t - t * t)) / ((1 - t * t) + t * t * A)
        return 2 * (T(x0) - x0) - 2 * cond


def exact_model(h, acc=True):
    nets = {"vel": ExactVelocity(h)} | ({"acc": ExactAcceleration()} if acc else {})
    meta = {"method": "caf", "method_config": caf.Config().model_dump(mode="json")}
    return LoadedModel(meta, nn.ModuleDict(nets), CAF(h=h))


@pytest.mark.parametrize("h", [1.5, 0.7, 2.0])
@pytest.mark.parametrize("N", [1, 2, 3, 7])
def test_sampler_with_exact_v0_and_a_lands_on_x1_and_inverts(h, N):
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    model = exact_model(h)
    x1 = caf.sample(model, x0, N + 1)                          # N steps spend N + 1 evaluations
    assert torch.allclose(x1, T(x0), rtol=0, atol=1e-12)
    assert torch.allclose(caf.invert(model, T(x0), N + 1), x0, rtol=0, atol=1e-12)
    # the states of `trajectory` lie on the interpolant (1 − t²)·x0 + t²·x1 + v0·(t − t²), which with
    # the true v0 is x0 + κ(t)·(x1 − x0), at equal steps in κ: x0 + (i/N)·(x1 − x0)
    path, v0 = caf.trajectory(model, x0, N), h * (T(x0) - x0)
    assert path.shape == (N + 1, 64, 2)
    for i in range(N + 1):
        assert torch.allclose(path[i], x0 + i / N * (T(x0) - x0), atol=1e-12)
    t = torch.tensor(0.3, dtype=torch.float64)  # and the interpolant is that line (κ = t² + h(t − t²))
    assert torch.allclose((1 - t * t) * x0 + t * t * T(x0) + v0 * (t - t * t),
                          x0 + (t * t + h * (t - t * t)) * (T(x0) - x0), atol=1e-12)
    # the velocity-only answer (1 NFE, and velocity-only models at any N) is exact here too
    assert torch.allclose(caf.sample(model, x0, 1), T(x0), atol=1e-12)
    assert torch.allclose(caf.sample(exact_model(h, acc=False), x0, N), T(x0), atol=1e-12)
    assert torch.allclose(caf.invert(exact_model(h, acc=False), T(x0), N), x0, atol=1e-12)


def test_exactness_needs_the_midpoint_time():
    """The same oracle with plain Euler on dx/dt = v0 + a·t (a at the start time t_i, no Δt/2)
    misses x1 at N = 2 by O(1/N): exactness is a property of CAF's step, not of the oracle."""
    h, N, x0 = 1.5, 2, torch.randn(64, 2, dtype=torch.float64)
    vel, acc = caf.velocity_fn(ExactVelocity(h)), caf.acceleration_fn(ExactAcceleration())
    v, x = vel(x0, 0.0), x0
    for i in range(N):
        x = x + (v + (i / N) * acc(x, i / N, v)) / N
    assert (x - T(x0)).abs().max() > 0.05


def _public_reconstruction(vel, acc, x, N):
    """CAF's code (`inversion` with return_dict, then `sample(..., pred_vel=...)`, as its
    reconstruction script runs them), transcribed: times linspace(0, 1000, N + 1).long()/1000,
    dt = 1/N; inversion z ← z − v·dt − (t_rev − 1/(2N))·a(z, t_rev, v)·dt from v = vel(x, 1); sampling
    z ← z + v·dt + (t + 1/(2N))·a(z, t, v)·dt with the inversion's v (not a fresh vel(z, 0))."""
    times = torch.linspace(0, 1000, N + 1).long().double() / 1000
    one = torch.ones(x.shape[0], dtype=x.dtype)
    v, z, dt = vel(x, one), x.clone(), 1 / N
    for r in times.flip(0)[:-1]:
        z = z - v * dt - (r - 1 / (2 * N)) * acc(z, one * r, v) * dt
    for t in times[:-1]:
        z = z + v * dt + (t + 1 / (2 * N)) * acc(z, one * t, v) * dt
    return z


def _random_caf(h=1.5):
    """A two-network CAF model of arbitrary smooth functions (not a coupling's exact ones)."""
    g = torch.Generator().manual_seed(7)
    W1, W2, W3 = (torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    vel = _Fn(lambda x, t, cond=None, class_labels=None: torch.tanh(x @ W1 + t[:, None]) + 0.3 * x)
    acc = _Fn(lambda x, t, cond=None, class_labels=None: torch.sin(x @ W2 + cond @ W3 - t[:, None]))
    meta = {"method": "caf", "method_config": caf.Config().model_dump(mode="json")}
    return LoadedModel(meta, nn.ModuleDict({"vel": vel, "acc": acc}), CAF(h=h))


@pytest.mark.parametrize("N", [1, 2, 4])
def test_reconstruction_keeps_the_inversions_initial_velocity(N):
    """`reconstruct` is CAF's code's reconstruction (an independent transcription above) to float
    precision, on networks that are not a coupling's; it is not sample(invert(x)), which draws a
    fresh v̂ = v(z, 0). Closed form: an acceleration that depends on v̂ alone makes every path an
    exact parabola, so keeping v̂ reconstructs x exactly for any N; a fresh v̂ does not."""
    x = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    model = _random_caf()
    vel, acc = caf.velocity_fn(model.nets["vel"]), caf.acceleration_fn(model.nets["acc"])
    ref = _public_reconstruction(lambda x, t: vel(x, t), lambda x, t, v: acc(x, t, v), x, N)
    assert torch.allclose(caf.reconstruct(model, x, N + 1), ref, rtol=0, atol=1e-12)
    fresh = caf.sample(model, caf.invert(model, x, N + 1), N + 1)
    assert ((fresh - ref) ** 2).sum(1).mean() > 1e-2
    model.nets["acc"] = _Fn(lambda x, t, cond=None, class_labels=None: -0.5 * cond)
    assert torch.allclose(caf.reconstruct(model, x, N + 1), x, rtol=0, atol=1e-12)
    assert ((caf.sample(model, caf.invert(model, x, N + 1), N + 1) - x) ** 2).sum(1).mean() > 1e-2
    # one NFE, or a velocity-only model: there is no v̂ to keep, reconstruction is sample(invert(x))
    assert torch.equal(caf.reconstruct(model, x, 1), caf.sample(model, caf.invert(model, x, 1), 1))


def test_clamp_bounds_samples_only_when_set():
    model, x0 = exact_model(1.5), 3 * torch.randn(64, 2, dtype=torch.float64)
    model.meta["method_config"] = caf.Config(clamp=1.0).model_dump(mode="json")
    out = caf.sample(model, x0, 2)
    assert out.abs().max() <= 1.0 and torch.allclose(out, T(x0).clamp(-1, 1), atol=1e-12)
    assert caf.sample(exact_model(1.5), x0, 2).abs().max() > 1.0


# ----------------------------------------------------------------------------- training

NET = NetworkConfig(arch="mlp", width=16, depth=1, emb_dim=8)


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(kind="toy", name="8gaussians", n_train=256, n_test=64))


def _pairs(n=256):
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    return {"noise": z, "sample": T(z.double()).float(), "label": torch.full((n,), -1)}


def _trained_velocity(data, h=1.5):
    """A velocity model as a stage saves it (a LoadedModel), with a random non-zero output layer."""
    m = caf.Method(caf.Config(), Context(data, CAF(h=h), NET, {"pairs": _pairs()}))
    torch.manual_seed(3)
    nn.init.normal_(m.nets["vel"].out.weight, std=0.5)
    meta = {"method": "caf", "method_config": m.cfg.model_dump(mode="json"),
            "networks": {"vel": m.net_cfgs["vel"].model_dump(mode="json")}}
    return LoadedModel(meta, m.nets, m.ctx.noise)


class _Fn(nn.Module):
    """A function as a network."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, *a, **k):
        return self.f(*a, **k)


def test_losses_vanish_on_the_exact_networks_and_use_the_learned_v0(data):
    torch.manual_seed(0)
    pairs = _pairs()
    batch = {"x0": pairs["noise"], "x1": pairs["sample"]}
    vel = caf.Method(caf.Config(), Context(data, CAF(), NET, {"pairs": pairs}))
    vel.nets["vel"] = ExactVelocity(1.5).float()
    assert vel.loss("vel", batch, 0)[0] < 1e-10                   # x_t built with the true v0
    acc = caf.Method(caf.Config(part="acceleration"),
                     Context(data, CAF(), NET, {"pairs": pairs, "velocity": _trained_velocity(data)}))
    acc.nets["acc"] = ExactAcceleration().float()
    assert acc.loss("acc", batch, 0)[0] < 1e-10                   # x_t rebuilt with v̂, target 2(x1 − x0) − 2v̂
    v_hat = caf.velocity_fn(acc.nets["vel"])(batch["x0"], 0.0)
    assert (v_hat - 1.5 * (batch["x1"] - batch["x0"])).abs().mean() > 0.1  # v̂ is far from the true v0
    # the acceleration of the true v0, 2(x1 − x0) − 2·h(x1 − x0), is not the target when v̂ ≠ v0
    acc.nets["acc"] = _Fn(lambda x, t, cond=None: (2 - 2 * 1.5) * (batch["x1"] - batch["x0"]))
    assert acc.loss("acc", batch, 0)[0] > 0.1


def test_acceleration_stage_trains_only_the_acceleration_and_exports_both(data):
    velmodel = _trained_velocity(data)
    m = caf.Method(caf.Config(part="acceleration"), Context(data, CAF(), None, {"pairs": _pairs(), "velocity": velmodel}))
    assert m.export == ("vel", "acc") and [g.name for g in m.groups()] == ["acc"]
    assert m.net_cfgs["acc"] == m.net_cfgs["vel"] == velmodel.meta_net_cfg("vel")   # network: the velocity's
    assert all(torch.equal(v, velmodel.nets["vel"].state_dict()[k]) for k, v in m.nets["vel"].state_dict().items())
    pairs = _pairs()
    loss, _ = m.loss("acc", {"x0": pairs["noise"][:32], "x1": pairs["sample"][:32]}, 0)
    loss.backward()
    assert all(p.grad is None for p in m.nets["vel"].parameters())
    assert m.nets["acc"].out.weight.grad.abs().sum() > 0


def test_method_refuses_bad_inputs_in_one_line(data):
    with pytest.raises(ValueError, match=r"^noise.process: method 'caf' trains in the caf process, not 'edm'$"):
        from fastgen_core.noise import EDM
        caf.Method(caf.Config(), Context(data, EDM(), NET, {"pairs": _pairs()}))
    with pytest.raises(ValueError, match=r"inputs.velocity: .*same caf process") as e:
        caf.Method(caf.Config(part="acceleration"),
                   Context(data, CAF(h=2.0), NET, {"pairs": _pairs(), "velocity": _trained_velocity(data)}))
    assert "\n" not in str(e.value)
    bad = {**_pairs(), "noise": torch.randn(256, 3), "sample": torch.randn(256, 3)}
    with pytest.raises(ValueError, match=r"^inputs.pairs: couplings of shape \(3,\)"):
        caf.Method(caf.Config(), Context(data, CAF(), NET, {"pairs": bad}))


# ----------------------------------------------------------------------------- the GAN stage

def _trained_acceleration(data):
    """A two-network model as the acceleration stage saves it, with random non-zero output layers."""
    m = caf.Method(caf.Config(part="acceleration"),
                   Context(data, CAF(), None, {"pairs": _pairs(), "velocity": _trained_velocity(data)}))
    torch.manual_seed(4)
    nn.init.normal_(m.nets["acc"].out.weight, std=0.5)
    meta = {"method": "caf", "method_config": m.cfg.model_dump(mode="json"),
            "networks": {n: c.model_dump(mode="json") for n, c in m.net_cfgs.items()}}
    return LoadedModel(meta, m.nets, m.ctx.noise)


def _gan(data, acc_model=None):
    """The GAN stage on CAF's defaults (hinge, adaptive weight, g_every 2) with CAF's GAN t grid."""
    cfg = caf.Config(part="acceleration", gan=caf.GANSettings(), t_levels=10)
    acc_model = acc_model or _trained_acceleration(data)
    return caf.Method(cfg, Context(data, CAF(), None, {"pairs": _pairs(), "acceleration": acc_model}))


def _cafs_generator_loss(vel, acc, D, x0, x1, t):
    """CAF's code (`adversarial_training_losses` on a generator step, `get_GAN_loss`,
    `calculate_adaptive_weight`), transcribed: v̂ = velmodel(x0, 0) (v0 input zeros); x_t =
    (1 − t²)·x0 + t²·x1 + v̂·(t − t²); caf_loss = mean_flat((a(x_t, t, v̂) − (2(x1 − x0) − 2v̂))²);
    fake x0 + v̂·1 + ½·a(x0, 0, v̂)·1; g_loss = mean(−D(fake)); d_weight = ‖∇_W 2·caf_loss‖/(‖∇_W
    g_loss‖ + 1e-4) clamped to [0, 1e4], clipped to [0.01, 10], W the last layer; loss caf_loss +
    d_weight·g_loss. Returns (loss, d_weight)."""
    n, zero = x0.shape[0], torch.zeros(x0.shape[0])
    with torch.no_grad():
        v = vel(x0, zero, cond=torch.zeros_like(x0))
    tc = t[:, None]
    x_t = (1 - tc**2) * x0 + tc**2 * x1 + v * (tc - tc**2)
    l_caf = ((acc(x_t, t, cond=v) - (2 * (x1 - x0) - 2 * v)) ** 2).mean(1).mean()
    g_loss = (-D(x0 + v + 0.5 * acc(x0, zero, cond=v))).mean()
    W = acc.out.weight
    g1 = torch.autograd.grad(2 * l_caf, W, retain_graph=True)[0]
    g2 = torch.autograd.grad(g_loss, W, retain_graph=True)[0]
    w = torch.clip(torch.clamp(g1.norm() / (g2.norm() + 1e-4), 0.0, 1e4), 0.01, 10).detach()
    assert n == x1.shape[0]
    return l_caf + w * g_loss, w


def test_gan_generator_loss_is_cafs_with_the_adaptive_weight_clipped(data):
    """The generator's loss and weight against the transcription of CAF's code above (t on CAF's GAN
    grid {0, 0.1, …, 1}, drawn first); then the clip: a discriminator whose logits are scaled by 10⁶
    (‖∇L_G‖ huge) gets the floor 0.01, one scaled by 10⁻⁶ the ceiling 10."""
    m, pairs = _gan(data), _pairs()
    batch = {"x0": pairs["noise"][:64], "x1": pairs["sample"][:64]}
    with torch.no_grad():
        m.nets["disc"].out.weight.mul_(1000)                      # logits of order 1: λ inside the clip
    torch.manual_seed(5)
    loss, logs = m.loss("acc", batch, 0)
    torch.manual_seed(5)
    t = torch.randint(0, 11, (64,)) / 10
    ref, w = _cafs_generator_loss(m.nets["vel"], m.nets["acc"], m.nets["disc"], batch["x0"], batch["x1"], t)
    assert 0.01 < float(w) < 10, "the unclipped regime"
    assert torch.allclose(logs["gan_weight"], w, rtol=1e-5) and torch.allclose(loss, ref, rtol=1e-5)
    for scale, bound in ((1e6, 0.01), (1e-6, 10.0)):
        with torch.no_grad():
            m.nets["disc"].out.weight.mul_(scale)
        torch.manual_seed(5)
        assert float(m.loss("acc", batch, 0)[1]["gan_weight"]) == pytest.approx(bound, rel=1e-6)
        with torch.no_grad():
            m.nets["disc"].out.weight.div_(scale)


def test_gan_stage_alternates_and_each_loss_updates_only_its_own_network(data):
    """CAF's loop: the generator (acceleration) steps when step % 2 == 0, the discriminator on the
    other steps. The generator's loss leaves the discriminator and the frozen velocity without
    gradient; the discriminator's loss leaves both networks without gradient and sees data points
    (not the couplings' x1) as real and the 1-step samples x0 + v̂ + ½·a(x0, 0, v̂) as fake."""
    acc_model = _trained_acceleration(data)
    m, pairs = _gan(data, acc_model), _pairs()
    assert m.export == ("vel", "acc")
    for n in ("vel", "acc"):                                        # finetuned from the acceleration stage
        assert all(torch.equal(v, acc_model.nets[n].state_dict()[k]) for k, v in m.nets[n].state_dict().items())
    groups = {g.name: g for g in m.groups()}
    assert [s for s in range(8) if groups["acc"].due(s)] == [0, 2, 4, 6]
    assert [s for s in range(8) if groups["disc"].due(s)] == [1, 3, 5, 7]
    assert groups["disc"].lr_scale == 50.0
    batch = {"x0": pairs["noise"][:64], "x1": pairs["sample"][:64]}
    m.loss("acc", batch, 0)[0].backward()
    assert all(p.grad is None for n in ("disc", "vel") for p in m.nets[n].parameters())
    assert m.nets["acc"].out.weight.grad.abs().sum() > 0
    m.nets["acc"].zero_grad(set_to_none=True)
    seen = []
    hook = m.nets["disc"].register_forward_hook(lambda mod, inp, out: seen.append((inp[0].detach(), out.detach())))
    loss, _ = m.loss("disc", batch, 1)
    hook.remove()
    loss.backward()
    assert all(p.grad is None for n in ("acc", "vel") for p in m.nets[n].parameters())
    assert m.nets["disc"].out.weight.grad.abs().sum() > 0
    (real, r), (fake, f) = seen
    assert all(bool((data.x == row).all(1).any()) for row in real)                 # rows of the data set
    assert not any(bool((batch["x1"] == row).all(1).any()) for row in real)
    x0, zero = batch["x0"], torch.zeros(64)
    v = m.nets["vel"](x0, zero)
    assert torch.allclose(fake, x0 + v + 0.5 * m.nets["acc"](x0, zero, cond=v), atol=1e-6)
    assert torch.allclose(loss, torch.relu(1 - r).mean() + torch.relu(1 + f).mean())


# ----------------------------------------------------------------------------- mixture → mixture

def test_a_source_mixture_replaces_the_standard_normal_only_where_set():
    """`noise.source` (flows and CAF): `draw` returns the named toy mixture's samples, the same
    stream as the data's own sampler (so a pair set's noise is a source draw), and without a source
    it is exactly torch.randn (existing pair sets and evaluations unchanged; the process dump, hence
    every stage digest, has no `source` key)."""
    from fastgen_core.data import triangle
    from fastgen_core.noise import Flow
    for P in (CAF(source="triangle"), Flow(source="triangle")):
        z = P.draw(30000, (2,), torch.Generator().manual_seed(5))
        assert torch.equal(z, triangle().sample(30000, torch.Generator().manual_seed(5))[0])
        comp = triangle().mode_of(z)
        assert torch.allclose(torch.bincount(comp, minlength=3).float() / 30000, torch.full((3,), 1 / 3), atol=0.01)
        assert triangle().on_support(z).float().mean() > 0.985      # 98.9% within 3 std of a mode
        assert P.draw_like(torch.zeros(7, 2, dtype=torch.float64)).dtype == torch.float64
    assert torch.equal(CAF().draw(64, (2,), torch.Generator().manual_seed(5)),
                       torch.randn((64, 2), generator=torch.Generator().manual_seed(5)))
    assert CAF().model_dump() == {"process": "caf", "h": 1.5} and "source" not in Flow().model_dump()
    with pytest.raises(ValueError, match="not samples of shape"):
        CAF(source="triangle").draw(4, (1, 8, 8))


class _AtZero:
    """A process whose training times are all t = 0 (so the velocity loss reads v at x_0 = x0)."""

    def __init__(self, P):
        self.P = P

    def __getattr__(self, k):
        return getattr(self.P, k)

    def sample_t(self, n, device=None, generator=None, levels=1000):
        return torch.zeros(n, device=device)


def test_independent_couplings_start_from_the_source(data):
    """CAF without reflow on a source draws x0 from it: a network answering h·(x1 − μ), μ the
    triangle mode nearest to its input x0, has the loss h²·std² = 2.25·0.35² per dimension against
    source draws, and a far larger one against standard-normal x0 (no source)."""
    from fastgen_core.data import triangle
    tri, x1 = triangle(), data.x.repeat(8, 1)                       # 2048 points
    losses = []
    for P in (CAF(source="triangle"), CAF()):
        torch.manual_seed(0)
        m = caf.Method(caf.Config(couplings="independent"), Context(data, P, NET, {}))
        m.nets["vel"] = _Fn(lambda x, t, cond=None, class_labels=None: 1.5 * (x1 - tri.means.float()[tri.mode_of(x)]))
        m.P = _AtZero(P)
        losses.append(float(m.loss("vel", {"x1": x1}, 0)[0]))
    assert abs(losses[0] - 2.25 * 0.35**2) < 0.03 and losses[1] > 2 * losses[0]


# ----------------------------------------------------------------------------- recipe validation

RAW = yaml.safe_load((ROOT / "params/toy_caf.yaml").read_text())


def _problems(**changes) -> list[str]:
    raw = copy.deepcopy(RAW)
    for path, v in changes.items():
        *head, last = path.split("__")
        node = raw
        for k in head:
            node = node[k]
        if v is None:
            node.pop(last)
        else:
            node[last] = v
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "toy_caf.yaml")
    return e.value.problems


@pytest.mark.parametrize("changes, line", [
    ({"stages__caf__inputs": {"pairs": "pairs"}},
     "toy_caf.yaml: stages.caf.inputs.velocity: method 'caf' needs input 'velocity'"),
    ({"stages__caf_vel__inputs": {}}, "toy_caf.yaml: stages.caf_vel.inputs.pairs: method 'caf' needs input 'pairs'"),
    ({"stages__caf__inputs": {"pairs": "pairs", "velocity": "rf2"}},
     "toy_caf.yaml: stages.caf.inputs.velocity: needs a model trained with method 'caf', got 'rf'"),
    ({"stages__caf_vel__inputs": {"pairs": "teacher"}}, "toy_caf.yaml: stages.caf_vel.inputs.pairs: stage 'teacher' (teacher) makes no pair set"),
    ({"stages__caf_vel__noise": None}, "toy_caf.yaml: noise.process: method 'caf' trains in the caf process, not 'edm'"),
    ({"stages__caf_vel__noise": {"process": "caf", "h": 3.0}}, "toy_caf.yaml: stages.caf_vel.noise"),
    ({"stages__caf_vel__method": {"name": "caf", "part": "jerk"}}, "toy_caf.yaml: stages.caf_vel.method"),
    ({"stages__caf_gan__inputs": {"pairs": "pairs"}},
     "toy_caf.yaml: stages.caf_gan.inputs.acceleration: method 'caf' needs input 'acceleration'"),
    ({"stages__caf_gan__method__part": "velocity"},
     "toy_caf.yaml: stages.caf_gan.method.gan: CAF's GAN stage finetunes the acceleration: needs part: acceleration"),
    ({"stages__caf_gan__method__gan__g_every": 1}, "toy_caf.yaml: stages.caf_gan.method.gan.g_every: "),
    ({"stages__caf_gan__method__gan__noised": True}, "toy_caf.yaml: stages.caf_gan.method.gan.noised: "),
])
def test_recipe_problems_are_one_line_each(changes, line):
    probs = _problems(**changes)
    assert any(p.startswith(line) for p in probs), probs
    assert all("\n" not in p for p in probs)


@pytest.mark.parametrize("stage, noise, line", [
    ("caf_vel", {"process": "caf", "h": 1.5},
     "toy_caf_mixture.yaml: stages.caf_vel.inputs.pairs: the pairs of 'pairs' start from the noise.source of its "
     "teacher 'rf1' (triangle), this stage's process from standard normal: give both the same noise.source"),
    ("rf2", {"process": "flow", "source": "checkerboard"},
     "toy_caf_mixture.yaml: stages.rf2.noise.source: source 'checkerboard' is not a 2D toy Gaussian mixture"),
])
def test_mixture_recipe_problems_are_one_line_each(stage, noise, line):
    raw = yaml.safe_load((ROOT / "params/toy_caf_mixture.yaml").read_text())
    raw["stages"][stage]["noise"] = noise
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "toy_caf_mixture.yaml")
    assert any(p.startswith(line) for p in e.value.problems), e.value.problems
    assert all("\n" not in p for p in e.value.problems)
