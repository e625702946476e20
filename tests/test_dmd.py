"""DMD and DMD2 (docs/methods.md §5, §6): the distribution-matching gradient vanishes when the fake
critic is the real score, the generator's loss never updates the critic or the GAN head, the head
reads the fake critic's bottleneck (not the teacher's), backward simulation feeds the generator at the
noise level of grid step k, DMD's regression pairs enter the generator as σ_max·z, and the critic /
generator step schedules of both two time-scale rules, run through the one loop."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgen_core import loop
from fastgen_core.config import DataConfig, NetworkConfig, TrainConfig
from fastgen_core.data import load_data
from fastgen_core.methods import dmd, dmd2
from fastgen_core.methods.base import Context, Group
from fastgen_core.nets import build_network
from fastgen_core.noise import EDM, EDMDenoiser

NCFG = NetworkConfig(arch="mlp", width=32, depth=2, emb_dim=16)


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(kind="toy", name="8gaussians", n_train=512, n_test=64))


class Teacher:
    """LoadedModel-like EDM teacher with a random network whose output is not zero."""

    meta = {"method": "edm"}

    def __init__(self, data, seed=0, scale=0.3):
        torch.manual_seed(seed)
        net = build_network(NCFG, data.shape, data.num_classes)
        nn.init.normal_(net.out.weight, std=scale)
        nn.init.normal_(net.out.bias, std=scale)
        self.nets, self.noise = nn.ModuleDict({"net": net.requires_grad_(False)}), EDM()

    def meta_net_cfg(self, name="net"):
        return NCFG

    def denoiser(self, name="net"):
        return EDMDenoiser(self.nets[name], self.noise)


def _method(mod, data, ins, **cfg):
    torch.manual_seed(1)
    return mod.Method(mod.Config(**cfg), Context(data, EDM(), None, ins))


def _batch(data, n=64):
    return {"x": data.x[:n]}


def _grads(module):
    return [p.grad for p in module.parameters()]


# ----------------------------------------------------------------------------- DM gradient

def test_dm_gradient_is_zero_when_the_fake_critic_is_the_real_score(data):
    """The critic starts as a copy of the teacher: the generator's DM gradient is exactly zero; once
    the critic differs from the teacher it is not (DMD Eq. 7: g ∝ p_real − p_fake)."""
    teacher = Teacher(data)
    m = _method(dmd2, data, {"teacher": teacher})
    loss, _ = m.loss("net", _batch(data), 0)
    loss.backward()
    assert all(g is None or torch.count_nonzero(g) == 0 for g in _grads(m.nets["net"]))
    assert loss.item() == 0.0

    m.nets["net"].zero_grad(set_to_none=True)
    with torch.no_grad():
        m.nets["critic"].out.bias.add_(0.1)  # μ_fake ≠ μ_real
    loss, _ = m.loss("net", _batch(data), 0)
    loss.backward()
    assert sum(float(g.abs().sum()) for g in _grads(m.nets["net"]) if g is not None) > 0


def test_dm_gradient_matches_its_definition_and_is_nan_safe():
    """g = (p_real − p_fake)/mean|p_real| per sample (transcribed from DMD2's code with closed-form
    scores), and a sample whose p_real and p_fake are exactly zero gets g = 0, not NaN (0/0)."""
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]])
    x_t = x + 0.3
    mu_real = lambda x_t, s: x_t * 0.5  # noqa: E731
    mu_fake = lambda x_t, s: x_t * 0.25  # noqa: E731
    sigma = torch.ones(3)
    g = dmd.dm_gradient(x, x_t, sigma, mu_real, mu_fake)
    for i in range(3):
        p_real = x[i] - 0.5 * x_t[i]
        p_fake = x[i] - 0.25 * x_t[i]
        want = (p_real - p_fake) / p_real.abs().mean()
        assert torch.allclose(g[i], want)
    same = torch.tensor([[1.0, 2.0]])
    g0 = dmd.dm_gradient(same, same, torch.ones(1), lambda a, s: a, lambda a, s: a)  # 0/0
    assert torch.isfinite(g0).all() and torch.count_nonzero(g0) == 0
    # the surrogate's gradient in x is g/numel
    xr = x.clone().requires_grad_(True)
    dmd.dm_loss(xr, g).backward()
    assert torch.allclose(xr.grad, g / g.numel())


# ----------------------------------------------------------------------------- GAN

def test_generator_loss_leaves_critic_and_head_unchanged(data):
    """With the critic equal to the teacher (DM gradient zero), the generator's gradient comes from
    the GAN term alone: it reaches the generator through the head, yet no critic or head parameter
    gets a gradient; one generator step through the loop leaves both bit-for-bit unchanged. The term
    is checked against softplus(−C(G(z))).mean() written out here for the loss's own z (same seed),
    and by its measured effect: that one GAN-only step raises C on fresh generator samples."""
    m = _method(dmd2, data, {"teacher": Teacher(data)}, gan=True, gan_gen_weight=1.0)
    batch = _batch(data)
    torch.manual_seed(11)
    loss, logs = m.loss("net", batch, 0)
    torch.manual_seed(11)
    z = torch.randn_like(batch["x"])  # the loss's first draw: the generator's input noise
    s = EDM().sigma_max
    with torch.no_grad():
        c = m.logits(m.G(s * z, torch.full((len(z),), s)))
    assert abs(float(c.mean())) > 0.05  # a sign flip of C would change the value below
    assert float(logs["gan"]) == pytest.approx(float(F.softplus(-c).mean()), rel=1e-5)
    assert loss.item() == pytest.approx(float(logs["gan"]), rel=1e-6)  # DM term exactly zero
    loss.backward()
    assert sum(float(g.abs().sum()) for g in _grads(m.nets["net"]) if g is not None) > 0
    assert all(g is None for g in _grads(m.nets["critic"]) + _grads(m.nets["head"]))
    assert all(p.requires_grad for p in [*m.nets["critic"].parameters(), *m.nets["head"].parameters()])

    # the loop: exclusive alternation, step 0 is a generator-only step
    m = _method(dmd2, data, {"teacher": Teacher(data)}, gan=True, gan_gen_weight=1.0, schedule="alternate", ratio=5)
    torch.manual_seed(12)
    z = torch.randn(512, 2)
    with torch.no_grad():
        c_before = m.logits(m.one_step(z))
    before = copy.deepcopy(m.nets.state_dict())
    loop.train(m, TrainConfig(steps=1, batch_size=64, lr=1e-2), progress=False)
    after = m.nets.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(k.startswith("net.") for k in moved), moved
    with torch.no_grad():
        c_after = m.logits(m.one_step(z))
    assert float(c_after.mean() - c_before.mean()) > 0.01
    assert float(F.softplus(-c_after).mean()) < float(F.softplus(-c_before).mean())


def test_gan_head_reads_the_fake_critics_bottleneck(data):
    """Changing a critic layer before the bottleneck changes the logits; changing the critic's output
    layer (after the bottleneck) or the teacher's network does not."""
    teacher = Teacher(data)
    m = _method(dmd2, data, {"teacher": teacher}, gan=True)
    x = data.x[:32]
    with torch.no_grad():
        base = m.logits(x)
        teacher.nets["net"].blocks[0].fc1.weight.add_(0.5)
        assert torch.equal(m.logits(x), base)
        m.nets["critic"].out.weight.add_(0.5)
        assert torch.equal(m.logits(x), base)
        m.nets["critic"].blocks[0].fc1.weight.add_(0.5)
        assert not torch.allclose(m.logits(x), base)


def test_classifier_loss_updates_critic_backbone_and_head(data):
    """The classifier loss equals softplus(−C(x_real)).mean() + softplus(C(x_fake)).mean(), written
    out here from C on the loss's own inputs (x_fake = G(σ_max·z), z rebuilt from the same seed),
    and enters the critic group's loss with weight gan_cls_weight. Its gradient (the loss's minus
    the same loss with weight 0, same seed) is that of the hand-written expression: non-zero on the
    backbone below the bottleneck and on the head, zero on the critic's output layer."""
    batch, w, s = _batch(data), 0.5, EDM().sigma_max
    m = _method(dmd2, data, {"teacher": Teacher(data)}, gan=True, gan_cls_weight=w)
    m0 = _method(dmd2, data, {"teacher": Teacher(data)}, gan=True, gan_cls_weight=0.0)
    torch.manual_seed(21)
    loss, logs = m.loss("critic", batch, 0)
    loss.backward()
    torch.manual_seed(21)
    m0.loss("critic", batch, 0)[0].backward()
    assert all(g is None or torch.count_nonzero(g) == 0 for g in _grads(m0.nets["head"]))

    torch.manual_seed(21)
    z = torch.randn_like(batch["x"])  # the loss's first draw: the generator's input noise
    with torch.no_grad():
        x_fake = m.G(s * z, torch.full((len(z),), s))
    real, fake = m.logits(batch["x"]), m.logits(x_fake)
    want = F.softplus(-real).mean() + F.softplus(fake).mean()
    assert float(logs["cls"]) == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() == pytest.approx(float(logs["fake"]) + w * want.item(), rel=1e-5)

    critic = dict(m.nets["critic"].named_parameters())
    critic0 = dict(m0.nets["critic"].named_parameters())
    g_want = torch.autograd.grad(w * want, list(critic.values()) + list(m.nets["head"].parameters()),
                                 allow_unused=True)
    for (name, p), g in zip(critic.items(), g_want):
        diff = p.grad - critic0[name].grad
        if name.startswith("out."):  # after the bottleneck: the head does not read it
            assert g is None and torch.count_nonzero(diff) == 0, name
            continue
        assert torch.count_nonzero(g) > 0, name
        assert torch.allclose(diff, g, rtol=1e-3, atol=1e-4 * float(g.abs().max())), name
    for p, g in zip(m.nets["head"].parameters(), g_want[len(critic):]):
        assert torch.count_nonzero(p.grad) > 0 and torch.allclose(p.grad, g, rtol=1e-4, atol=1e-8)


def test_diffusion_gan_inputs_are_noised_over_the_grid(data):
    """gan_noised (DMD2's `compute_cls_logits` with --diffusion_gan): the critic reads x + σ·ε at
    σ = karras_sigmas[i], i ~ U{0 … max − 1} of the ascending grid (the whole grid by default, the
    first `gan_noise_levels` otherwise); without it, the clean x at the smallest level."""
    torch.manual_seed(0)
    x0 = torch.full((4000, 2), 0.3)
    levels = _karras_dmd2(1000, EDM().sigma_min, EDM().sigma_max).float()
    for kw, top in [({"gan_noised": True}, 999), ({"gan_noised": True, "gan_noise_levels": 10}, 9), ({}, 0)]:
        m = _method(dmd2, data, {"teacher": Teacher(data)}, gan=True, **kw)
        seen = {}
        m.features = lambda x, sigma, **c: seen.update(x=x, sigma=sigma) or torch.zeros(len(x), 32)
        m.logits(x0)
        i = torch.searchsorted(levels, seen["sigma"].clamp(max=levels[-1]))
        assert torch.allclose(levels[i.clamp(max=999)], seen["sigma"], rtol=1e-4)
        assert int(i.max()) >= top - max(top // 50, 0) and int(i.max()) <= top and int(i.min()) <= top // 50
        if not kw:
            assert torch.equal(seen["x"], x0)
            continue
        e = (seen["x"] - x0) / seen["sigma"][:, None]
        assert abs(float(e.mean())) < 0.05 and abs(float(e.std()) - 1) < 0.05


# ----------------------------------------------------------------------------- multi-step

def _karras_dmd2(n, sigma_min, sigma_max, rho=7.0):
    """DMD2's grid: k-diffusion's Karras ramp, flipped so that small σ comes first."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return s.flip(0)


def test_generator_levels_are_dmd2s_timesteps():
    """A 4-step generator's levels are DMD2's timesteps 999, 749, 499, 249 of the 1000-level grid."""
    noise = EDM()
    want = _karras_dmd2(1000, noise.sigma_min, noise.sigma_max)[[999, 749, 499, 249]]
    assert torch.allclose(dmd.generator_sigmas(noise, 1000, 4).double(), want, rtol=1e-5)
    assert float(dmd.generator_sigmas(noise, 1000, 1)[0]) == pytest.approx(noise.sigma_max)


def test_backward_simulation_inputs_have_the_noise_level_of_step_k(data):
    """With a generator that returns a known x0 = c, backward simulation's input at step k is
    σ_max·z for k = 0 and c + σ_k·ε for k ≥ 1 (mean c, std σ_k), and the generator was queried at
    σ_0 … σ_{k−1}; the method draws one k per iteration and hands σ_k with the input."""
    noise = EDM()
    sigmas = dmd.generator_sigmas(noise, 1000, 4)
    c = torch.tensor([0.7, -1.3])
    seen = []

    def G(x, sigma, **cond):
        seen.append(float(sigma[0]))
        return c.expand_as(x)

    torch.manual_seed(0)
    z = torch.randn(20000, 2)
    for k in range(4):
        seen.clear()
        x = dmd2.backward_simulate(G, z, sigmas, k)
        assert seen == pytest.approx(sigmas[:k].tolist())
        if k == 0:
            assert torch.equal(x, sigmas[0] * z)
            continue
        e = (x - c) / sigmas[k]
        assert e.mean(0).abs().max() < 0.03 and (e.std(0) - 1).abs().max() < 0.03

    m = _method(dmd2, data, {"teacher": Teacher(data)}, steps=4, inputs="backward")
    m.G = G
    batch = {"x": torch.zeros(4000, 2)}
    ks = set()
    for _ in range(40):
        x_in, sigma, logs = m.generator_input(batch)
        k = logs["k"]
        ks.add(k)
        assert torch.equal(sigma, sigmas[k].expand(4000))
        mean = c if k else torch.zeros(2)
        e = (x_in - mean) / sigmas[k]
        assert e.mean(0).abs().max() < 0.08 and (e.std(0) - 1).abs().max() < 0.08
    assert ks == {0, 1, 2, 3}


def test_noised_real_inputs(data):
    """inputs: real (FastGen) — the generator's input is real data noised to a per-sample level of the list."""
    m = _method(dmd2, data, {"teacher": Teacher(data)}, steps=4, inputs="real")
    x0 = torch.full((6000, 2), 0.25)
    x_in, sigma, _ = m.generator_input({"x": x0})
    sigmas = dmd.generator_sigmas(EDM(), 1000, 4)
    for s in sigmas:
        sel = torch.isclose(sigma, s)
        assert sel.sum() > 1000
        e = (x_in[sel] - 0.25) / s
        assert e.mean(0).abs().max() < 0.1 and (e.std(0) - 1).abs().max() < 0.1


# ----------------------------------------------------------------------------- DMD regression

def test_regression_pairs_enter_the_generator_as_sigma_max_z(data):
    """Pairs made from the generator itself at σ_max·z give a regression loss of exactly 0 (and the
    DM term is 0 with the critic equal to the teacher): the pair's standard-normal z is scaled
    exactly as the generator's training noise. Pairs made from unscaled z do not."""
    teacher = Teacher(data)
    torch.manual_seed(3)
    z = torch.randn(128, 2)
    with torch.no_grad():
        D = teacher.denoiser()
        s = EDM().sigma_max
        good = D(s * z, torch.full((128,), s))
        bad = D(z, torch.full((128,), s))
    for sample, zero in [(good, True), (bad, False)]:
        pairs = {"noise": z, "sample": sample, "label": torch.full((128,), -1)}
        m = _method(dmd, data, {"teacher": teacher, "pairs": pairs}, reg_weight=0.25)
        batch = {k: v[:64] for k, v in m.tensors().items()}
        loss, logs = m.loss("net", batch, 0)
        assert (logs["reg"] == 0.0) == zero
        assert (loss.item() == 0.0) == zero


def test_dmd_needs_pairs_only_with_regression():
    probs = dmd.Method.input_problems(dmd.Config(reg_weight=0.25), {"teacher": object()})
    assert any("pairs" in p for p in probs)
    assert dmd.Method.input_problems(dmd.Config(reg_weight=0.0), {"teacher": object()}) == []
    assert any("guide" in p for p in dmd2.Method.input_problems(
        dmd2.Config(guidance="auto", real_guidance=2.0), {"teacher": object()}))


def test_autoguided_real_score(data):
    """guidance auto: μ_real = D_guide + w·(D_teacher − D_guide) (autoguidance, docs/methods.md §12)."""
    teacher, guide = Teacher(data, seed=0), Teacher(data, seed=5)
    m = _method(dmd2, data, {"teacher": teacher, "guide": guide}, guidance="auto", real_guidance=2.0)
    x, s = torch.randn(16, 2), torch.full((16,), 1.5)
    with torch.no_grad():
        dt, dg = teacher.denoiser()(x, s), guide.denoiser()(x, s)
        assert torch.allclose(m.mu_real(x, s), dg + 2.0 * (dt - dg), atol=1e-6)


# ----------------------------------------------------------------------------- schedules

def test_group_due_generic():
    g = Group("c", [], every=1, skip_every=3)
    assert [s for s in range(10) if g.due(s)] == [1, 2, 4, 5, 7, 8]
    g = Group("g", [], every=3)
    assert [s for s in range(10) if g.due(s)] == [0, 3, 6, 9]


@pytest.mark.parametrize("schedule", ["dmd2", "alternate", "dmd"])
def test_step_schedules_through_the_loop(data, schedule):
    """Which group steps at which iteration, recorded from the loop over 12 iterations: DMD2's code
    (critic every iteration, generator at multiples of 5, generator first), FastGen's exclusive
    alternation (generator at multiples of 5, critic on the others), DMD 1:1."""
    if schedule == "dmd":
        m = _method(dmd, data, {"teacher": Teacher(data)}, reg_weight=0.0)
    else:
        m = _method(dmd2, data, {"teacher": Teacher(data)}, ratio=5, schedule=schedule)
    calls, inner = [], m.loss

    def loss(group, batch, step):
        calls.append((step, group))
        return inner(group, batch, step)

    m.loss = loss
    loop.train(m, TrainConfig(steps=12, batch_size=16, lr=1e-4), progress=False)
    if schedule == "dmd2":
        want = [(s, g) for s in range(12) for g in (["net", "critic"] if s % 5 == 0 else ["critic"])]
    elif schedule == "alternate":
        want = [(s, "net" if s % 5 == 0 else "critic") for s in range(12)]
    else:
        want = [(s, g) for s in range(12) for g in ("net", "critic")]
    assert calls == want


def test_a_resumed_stage_starts_its_critic_from_the_warm_start_critic(tiny_recipe):
    """DMD2's resume (its best ImageNet-64 model is a run resumed with the GAN head on) reloads the
    fake critic with the generator: the `dmd2` stage saves its critic's live weights beside the
    model (resume.safetensors), and a stage warm-started from it starts its critic from exactly
    those, not from the teacher; a classifier head the saved model had not is new."""
    from fastgen_core.models import load_model, load_resume
    from stages.recipe import load_recipe
    from stages.runtime import run_stage, stage_dir
    from stages.train import build_method

    train = {"steps": 12, "batch_size": 64, "lr": 1e-2, "ema_decay": 0.5, "optimizer": "adamw"}
    path = tiny_recipe(only=["teacher", "dmd2", "res"], tracking={"enabled": False}, stages={
        "teacher": {"train": {"steps": 20}},
        "dmd2": {"kind": "distill", "inputs": {"teacher": "teacher"},
                 "method": {"name": "dmd2", "ratio": 2}, "train": train},
        "res": {"kind": "distill", "inputs": {"teacher": "teacher", "warm_start": "dmd2"},
                "method": {"name": "dmd2", "ratio": 2, "gan": True}, "train": train}})
    recipe = load_recipe(path)
    run_stage(recipe, "teacher")
    run_stage(recipe, "dmd2")
    teacher_dir, dm_dir = stage_dir(recipe, "teacher"), stage_dir(recipe, "dmd2")
    saved = load_resume(dm_dir)
    assert set(saved) == {"critic"}
    teacher = load_model(teacher_dir).nets["net"].state_dict()
    assert saved["critic"].keys() == teacher.keys()
    assert any(not torch.equal(v, teacher[k]) for k, v in saved["critic"].items())  # it trained
    m = build_method(recipe, "res", {"teacher": [str(teacher_dir)], "warm_start": [str(dm_dir)]})
    for k, v in saved["critic"].items():
        assert torch.equal(m.nets["critic"].state_dict()[k], v)
    for k, v in load_model(dm_dir).nets["net"].state_dict().items():
        assert torch.equal(m.nets["net"].state_dict()[k], v)
    assert "head" in m.nets
    run_stage(recipe, "res")
    assert set(load_resume(stage_dir(recipe, "res"))) == {"critic", "head"}
