"""Consistency-family methods (docs/methods.md §1, §3, §4, §10): CT schedules, sCM and AYF JVPs against
finite differences, boundary conditions of CTM and flow maps, γ = 1 CTM sampling equals CM
multistep sampling, teacher initialisations, short NaN-free loop runs with the analytic mixture
teacher, and the 1D Gaussian analysis of CM vs flow-map multistep sampling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastgen_core import loop
from fastgen_core.config import DataConfig, NetworkConfig
from fastgen_core.data import load_data
from fastgen_core.methods import ayf, ct, ctm, scm
from fastgen_core.methods.base import Context
from fastgen_core.models import LoadedModel
from fastgen_core.nets import build_network
from fastgen_core.noise import EDM, EDMDenoiser, denoiser_in
from fastgen_core.config import TrainConfig
from fastgen_core.samplers import cm_multistep
from fastgen_core.tangents import jvp

torch.set_default_dtype(torch.float32)
NCFG = NetworkConfig(arch="mlp", width=32, depth=2, emb_dim=16)



@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(kind="toy", name="8gaussians", n_train=1000, n_test=100))


class FakeTeacher:
    """LoadedModel-like teacher: `nets`, `noise`, `meta_net_cfg`, `denoiser`. analytic=True: the
    exact mixture denoiser; else the EDM denoiser of its (random, non-zero-output) network."""

    def __init__(self, data, analytic=True, net_cfg=NCFG, seed=0):
        torch.manual_seed(seed)
        net = build_network(net_cfg, data.shape, data.num_classes)
        nn.init.normal_(net.out.weight, std=0.3)
        nn.init.normal_(net.out.bias, std=0.3)
        self.nets, self.noise, self.net_cfg = nn.ModuleDict({"net": net.requires_grad_(False)}), EDM(), net_cfg
        self.analytic, self.density = analytic, data.density

    def meta_net_cfg(self, name="net"):
        return self.net_cfg

    def denoiser(self, name="net"):
        if self.analytic:
            return lambda x, sigma, **k: self.density.denoiser(x, sigma)
        return EDMDenoiser(self.nets[name], self.noise)


def _method(mod, data, teacher=None, network=None, **cfg):
    inputs = {} if teacher is None else {"teacher": teacher}
    return mod.Method(mod.Config(**cfg), Context(data, EDM(), network, inputs))


def _loaded(method):
    """The trained method as a LoadedModel (its online weights), for the samplers."""
    meta = {"method": method.cfg.name, "method_config": method.cfg.model_dump(mode="json")}
    return LoadedModel(meta, method.nets, method.ctx.noise)


def _randomise_output(net, std=0.3):
    with torch.no_grad():
        nn.init.normal_(net.out.weight, std=std)
        nn.init.normal_(net.out.bias, std=std)
        if hasattr(net.embed, "map_s"):
            nn.init.normal_(net.embed.map_s.weight, std=0.3)


def _flat_grad(net: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """∇ of `loss` over `net`'s parameters as one vector (zeros where a parameter gets none)."""
    net.zero_grad(set_to_none=True)
    loss.backward()
    out = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


class Net64(nn.Module):
    """A small smooth float64 network with the repository's calling convention (the library's
    nets compute their time embedding in float32, so float64 checks use this one)."""

    def __init__(self, dim=2, second_time=False, width=24, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim + 2, width, generator=g, dtype=torch.float64) / 2)
        self.w2 = nn.Parameter(torch.randn(width, dim, generator=g, dtype=torch.float64) / 4)
        self.second_time = second_time

    def forward(self, x, t, s=None, class_labels=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        s = torch.zeros_like(t) if s is None else torch.as_tensor(s, dtype=x.dtype).expand(x.shape[0])
        h = torch.cat([x, t[:, None], s[:, None]], 1) @ self.w1
        return torch.tanh(h) @ self.w2 + torch.sin(3 * t)[:, None] * x


# ----------------------------------------------------------------------------- CT

def _openai_ct_schedule(step: int, total_steps: int, start_scales: int, end_scales: int, start_ema: float):
    """Independent transcription of openai/consistency_models `cm/script_util.py`
    `create_ema_and_scales_fn` with target_ema_mode "adaptive", scale_mode "progressive" (CT):
    returns (target_ema, scales) as that function does, with numpy's float64 and int32 steps."""
    inner = (step / total_steps) * ((end_scales + 1) ** 2 - start_scales ** 2) + start_scales ** 2
    n_steps = max(int(np.int32(np.ceil(np.sqrt(inner) - 1))), 1)      # the step count before the +1
    c = -np.log(start_ema) * start_scales
    return float(np.exp(-c / n_steps)), n_steps + 1


def test_ct_schedules_match_openai_consistency_models():
    """N(k) and μ(k) against the public code's schedule function: μ divides by the step count N(k) − 1
    (0.81 at k = 0 for μ0 = 0.9, s0 = 2; the paper's formula with N(k) would give 0.90)."""
    K, s0, s1, mu0 = 1000, 2, 150, 0.9
    assert ct.mu_k(0, K, s0, s1, mu0) == pytest.approx(0.81, abs=1e-12)
    assert ct.N_k(0, K, s0, s1) == 2 and ct.N_k(K, K, s0, s1) == 151
    for (k_, s0_, s1_, mu0_) in [(k, s0, s1, mu0) for k in range(0, K + 1, 7)] + [(k, 3, 30, 0.95) for k in range(0, K + 1, 13)]:
        ema, scales = _openai_ct_schedule(k_, K, s0_, s1_, mu0_)
        assert ct.N_k(k_, K, s0_, s1_) == scales, k_
        assert ct.mu_k(k_, K, s0_, s1_, mu0_) == pytest.approx(ema, rel=1e-12), k_
    Ns = [ct.N_k(k, K, s0, s1) for k in range(0, K + 1, 10)]
    assert Ns == sorted(Ns)


def test_ct_target_ema_and_short_run(data):
    """θ⁻ starts as θ, and after the optimiser step of iteration k of the loop the target is
    μ(k)·θ⁻ + (1 − μ(k))·θ with μ(k) from the transcription of openai/consistency_models' schedule
    (`_openai_ct_schedule`: 0.81 at k = 0, then rising with N(k)), at every one of 40 loop steps."""
    m = _method(ct, data, network=NCFG, K=40, s1=20)
    assert "teacher" not in m.ctx.inputs
    target, online = m.nets["target"], m.nets["net"]
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))
    seen, after_step = [], m.after_step

    def spy(step):  # (step, θ⁻ before, θ after the optimiser step, θ⁻ after) around the method's update
        before = [p.clone() for p in target.parameters()]
        after_step(step)
        clone = lambda net: [p.clone() for p in net.parameters()]  # noqa: E731
        seen.append((step, before, clone(online), clone(target)))

    m.after_step = spy
    loop.train(m, TrainConfig(steps=40, batch_size=64, lr=1e-3), None, progress=False)
    assert m.N(0) == 2 and m.N(40) == 21 and [s[0] for s in seen] == list(range(40))
    mus = [_openai_ct_schedule(k, 40, 2, 20, 0.9)[0] for k in range(40)]
    assert mus[0] == pytest.approx(0.81) and mus[-1] > 0.98
    for k, (_, before, theta, after) in enumerate(seen):
        assert max((p - q).abs().max().item() for p, q in zip(theta, before)) > 1e-4, k   # θ and θ⁻ differ
        for p_before, p_online, p_after in zip(before, theta, after):
            want = mus[k] * p_before + (1 - mus[k]) * p_online
            assert torch.allclose(p_after, want, rtol=0, atol=1e-6), k
    assert all(torch.isfinite(p).all() for p in m.nets.parameters())
    x = ct.sample(_loaded(m), torch.randn(50, 2), 2)
    assert torch.isfinite(x).all()


def test_ct_K_defaults_to_the_stage_steps(data):
    """K: None spans the schedule over the stage's train.steps (Context.steps): the same run as K set by hand."""
    runs = {}
    for K, steps in ((None, 6), (6, 0)):
        torch.manual_seed(0)
        m = ct.Method(ct.Config(K=K, s1=10), Context(data, EDM(), NCFG, steps=steps))
        assert m.K == 6 and m.N(6) == 11
        runs[K] = loop.train(m, TrainConfig(steps=6, batch_size=32, lr=1e-3), None, progress=False)
    assert all(torch.equal(v, runs[6]["net"][k]) for k, v in runs[None]["net"].items())
    with pytest.raises(ValueError, match="train.steps"):
        ct.Method(ct.Config(), Context(data, EDM(), NCFG))


# ----------------------------------------------------------------------------- sCM

def test_scm_jvp_equals_finite_difference_float64():
    torch.manual_seed(0)
    net, sd = Net64(), 0.5
    x, t = torch.randn(16, 2, dtype=torch.float64), torch.rand(16, dtype=torch.float64) * 1.4 + 0.05
    v = torch.randn(16, 2, dtype=torch.float64)
    cs = torch.cos(t) * torch.sin(t)
    for kind in ("edm", "t"):
        F, cs_dF = scm.dF_dt(net, x, t, v, sd, kind, mode="func")
        h = 1e-6  # reference: central difference of F along (cs·v, cs), in float64
        Fp = scm.F_theta(net, x + h * cs[:, None] * v, t + h * cs, sd, kind)
        Fm = scm.F_theta(net, x - h * cs[:, None] * v, t - h * cs, sd, kind)
        ref = (Fp - Fm) / (2 * h)
        assert torch.equal(F, scm.F_theta(net, x, t, sd, kind))
        assert ((cs_dF - ref).norm() / ref.norm()).item() < 1e-3
        _, fd = scm.dF_dt(net, x, t, v, sd, kind, mode="fd", eps=1e-3)   # the fallback
        assert ((fd - ref).norm() / ref.norm()).item() < 1e-3


def test_scm_jvp_real_network_and_shared_dropout():
    torch.manual_seed(1)
    net = build_network(NCFG.model_copy(update={"dropout": 0.5}), (2,))
    _randomise_output(net)
    net.train()
    x, t, v = torch.randn(32, 2), torch.rand(32) * 1.4 + 0.05, torch.randn(32, 2)
    F_func, d_func = scm.dF_dt(net, x, t, v, 0.5, "edm", mode="func", seed=7)
    F_fd, d_fd = scm.dF_dt(net, x, t, v, 0.5, "edm", mode="fd", eps=1e-3, seed=7)
    from fastgen_core.methods.common import same_randomness
    with same_randomness(7):
        F = scm.F_theta(net, x, t, 0.5, "edm")
    assert torch.equal(F, F_func) and torch.equal(F, F_fd)            # one dropout mask for all passes
    assert ((d_func - d_fd).norm() / d_func.norm()).item() < 1e-2      # float32: looser than float64


def test_scm_student_starts_as_the_teacher(data):
    teacher = FakeTeacher(data, analytic=False)
    m = _method(scm, data, teacher)
    D_trig = denoiser_in("trigflow", teacher.denoiser(), 0.5)
    x, t = torch.randn(64, 2), torch.rand(64) * 1.5 + 0.02
    assert torch.allclose(scm.f_theta(m.nets["net"], x, t, 0.5, "edm"), D_trig(x, t), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="c_noise"):
        _method(scm, data, teacher, c_noise="t")


@pytest.mark.parametrize("variant", ["scd", "sct"])
def test_scm_loss_backward_and_short_run(data, variant):
    """The sCM gradient is the small-step limit of the discrete consistency gradient (Lu & Song 2024,
    §4: L_Δ/Δ as Δ → 0): on data N(0, c²I) with the exact teacher, at one time t (P_std → 0) and with
    a constant normalisation (c → ∞, w_φ = 0, r = 1), the loss's gradient on θ points as the gradient of
    the discrete CM loss E‖f_θ(x_t, t) − stopgrad f_θ(x_{t−Δ}, t − Δ)‖², built here from f_θ alone:
    x_{t−Δ} = (std_{t−Δ}/std_t)·x_t (sCD: the closed-form PF-ODE, std_t² = cos²t·c² + sin²t·σ_d²) or
    cos(t−Δ)·x0 + sin(t−Δ)·z (sCT: the same x0 and noise), independent draws, cosine > 0.95.
    Then a backward pass and a short run stay finite, and w_φ is trained jointly."""
    teacher = FakeTeacher(data, analytic=True)
    c, sd, B, dt = 0.7, 0.5, 2048, 1e-3
    std = lambda t: torch.sqrt(torch.cos(t) ** 2 * c * c + torch.sin(t) ** 2 * sd * sd)  # noqa: E731
    for P_mean in (-1.2, 0.3):
        m = _method(scm, data, teacher, variant=variant, init_from_teacher=False, weight_width=16,
                    P_mean=P_mean, P_std=1e-7, tangent_c=1e3, warmup_steps=0)
        m.D_trig = denoiser_in("trigflow", lambda x, s, **k: c**2 / (c**2 + s.reshape(-1, 1) ** 2) * x, sd)
        net = m.nets["net"]
        _randomise_output(net)
        torch.manual_seed(0)
        x0 = c * torch.randn(B, 2)
        g_scm = _flat_grad(net, m.loss("net", {"x": x0}, 0)[0])
        t = torch.full((B,), math.atan(math.exp(P_mean) / sd))
        z = sd * torch.randn(B, 2)
        x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
        if variant == "scd":
            x_prev = (std(t - dt) / std(t))[:, None] * x_t
        else:
            x_prev = torch.cos(t - dt)[:, None] * x0 + torch.sin(t - dt)[:, None] * z
        with torch.no_grad():
            target = scm.f_theta(net, x_prev, t - dt, sd, "edm")
        g_discrete = _flat_grad(net, (scm.f_theta(net, x_t, t, sd, "edm") - target).pow(2).sum(1).mean())
        assert _cosine(g_scm, g_discrete) > 0.95, P_mean
    m = _method(scm, data, teacher, variant=variant, init_from_teacher=False, warmup_steps=20, weight_width=16)
    loss, logs = m.loss("net", {"x": data.x[:64]}, 3)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.nets.parameters() if p.grad is not None]
    assert len(grads) > 0 and all(torch.isfinite(g).all() for g in grads)
    assert m.nets["weight"].mlp[-1].weight.grad.abs().sum() > 0       # w_φ is trained jointly
    m.nets.zero_grad()
    loop.train(m, TrainConfig(steps=50, batch_size=64, lr=1e-3), None, progress=False)  # raises on NaN/inf
    assert all(torch.isfinite(p).all() for p in m.nets.parameters())
    for nfe in (1, 2, 4):
        assert torch.isfinite(scm.sample(_loaded(m), torch.randn(100, 2), nfe)).all()


def test_scm_tangent_vanishes_at_the_exact_consistency_model():
    """Data N(0, c²I): the exact TrigFlow CM is f*(x_t, t) = c·x_t/std_t, std_t² = cos²t·c² + sin²t·σ_d².
    With F = F* and the sCD velocity of the exact EDM denoiser c²/(c² + σ²)·x (through
    denoiser_in("trigflow")), the tangent g (r = 1) is zero: the fixed point of the objective."""
    c, sd = 0.7, 0.5
    std = lambda t: torch.sqrt(torch.cos(t) ** 2 * c * c + torch.sin(t) ** 2 * sd * sd)  # noqa: E731

    class FStar(nn.Module):  # F*(x_t/σ_d, t) = (cos t·x_t − f*)/(sin t·σ_d), time label t (c_noise "t")
        def forward(self, x_in, t, **k):
            x, t = sd * x_in, t[:, None]
            return (torch.cos(t) * x - c * x / std(t)) / (torch.sin(t) * sd)

    D_trig = denoiser_in("trigflow", lambda x, s, **k: c**2 / (c**2 + s.reshape(-1, 1) ** 2) * x, sd)
    x_t = torch.randn(32, 3, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64) * 1.4 + 0.1
    v = scm.dxt_dt_scd(D_trig, x_t, t)
    F, cs_dF = scm.dF_dt(FStar(), x_t, t, v, sd, "t")
    assert scm.tangent_g(F, cs_dF, v, x_t, t, 1.0, sd).abs().max().item() < 1e-10
    # and a wrong model gives a non-zero tangent
    assert scm.tangent_g(1.1 * F, cs_dF, v, x_t, t, 1.0, sd).abs().max().item() > 1e-2


def test_scm_tangent_normalisation_and_prior_weight_closed_forms(data):
    """`tangent_norm` and `prior_weight` (docs/methods.md §4) against closed forms.
    A constant tangent a in D dims has ‖g‖ = a·√D and RMS a. In the loss, at the start (w_φ = 0,
    F_θ = F_θ⁻) the residual is −g/(norm + c): with c → 0 its mean square ‖·‖²/D is 1/D (l2) or 1
    (rms). With the level fixed at σ = e^{P_mean} (P_std → 0) the prior weight 1/(σ_d·tan t) is 1/σ."""
    D, a, c = 64, 0.3, 0.1
    g = torch.full((3, D), a, dtype=torch.float64)
    assert torch.allclose(scm.normalise_tangent(g, c, "l2"), torch.full_like(g, a / (a * math.sqrt(D) + c)))
    assert torch.allclose(scm.normalise_tangent(g, c, "rms"), torch.full_like(g, a / (a + c)))
    teacher, P_mean, out = FakeTeacher(data, analytic=True), 0.5, {}
    for norm in ("l2", "rms"):
        for prior in (False, True):
            m = _method(scm, data, teacher, init_from_teacher=False, P_mean=P_mean, P_std=1e-7, tangent_c=1e-9,
                        warmup_steps=0, weight_width=16, tangent_norm=norm, prior_weight=prior)
            torch.manual_seed(0)
            loss, logs = m.loss("net", {"x": data.x[:64]}, 3)
            out[norm, prior] = (loss.item(), float(logs["sq"]))
    dim = data.x[0].numel()
    for prior in (False, True):
        assert out["l2", prior][1] == pytest.approx(1 / dim, rel=1e-4)
        assert out["rms", prior][1] == pytest.approx(1.0, rel=1e-4)
    for norm in ("l2", "rms"):
        assert out[norm, False][0] == pytest.approx(out[norm, False][1], rel=1e-6)                 # w = 0: L = ‖·‖²/D
        assert out[norm, True][0] == pytest.approx(math.exp(-P_mean) * out[norm, True][1], rel=1e-4)  # × 1/σ


# ----------------------------------------------------------------------------- CTM

def test_ctm_boundary_and_teacher_init(data):
    teacher = FakeTeacher(data, analytic=False)
    m = _method(ctm, data, teacher)
    x, t, s = torch.randn(64, 2), torch.rand(64) * 10 + 0.01, torch.rand(64) * 0.01 + 0.002
    D = teacher.denoiser()
    want = (s / t)[:, None] * x + (1 - s / t)[:, None] * D(x, t)       # one teacher Euler/DDIM step
    assert torch.allclose(m.G(x, t, s), want, atol=1e-5)
    _randomise_output(m.nets["net"])
    assert torch.equal(m.G(x, t, t), x)                                # G(x, t, t) = x exactly
    assert not torch.allclose(m.G(x, t, s), want, atol=1e-3)


def test_ctm_gamma1_sampling_is_cm_multistep(data):
    m = _method(ctm, data, FakeTeacher(data, analytic=False))
    _randomise_output(m.nets["net"])
    model, noise = _loaded(m), EDM()
    z = torch.randn(200, 2)
    for nfe in (1, 2, 4):
        f = lambda x, tau, **k: m.G(x, tau, noise.sigma_min)  # noqa: E731  CM f(x, τ) = G(x, τ, σ_min)
        taus = noise.karras_sigmas(nfe + 1)[:-1].tolist()
        torch.manual_seed(5)
        cm = cm_multistep(f, z, taus, noise.sigma_min)
        torch.manual_seed(5)
        times = noise.karras_sigmas(nfe + 1).tolist()
        times[-1] = noise.sigma_min
        g1 = ctm.gamma_sample(m.G, z, times, 1.0, noise.sigma_min)
        assert torch.allclose(cm, g1, atol=1e-6), nfe
    # γ = 0 is deterministic; the module-level sampler uses the config's γ
    m.cfg = m.cfg.model_copy(update={"gamma": 0.0})
    a, b = ctm.sample(_loaded(m), z, 3), ctm.sample(_loaded(m), z, 3)
    assert torch.equal(a, b)


def _chi2_quantile(df: int, z: float = 3.09) -> float:
    """Upper quantile of χ²(df) by the Wilson–Hilferty approximation (z = 3.09: the 0.999 quantile)."""
    h = 2 / (9 * df)
    return df * (1 - h + z * math.sqrt(h)) ** 3


def _chi2(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def test_ctm_teacher_solve_and_loss(data):
    """`teacher_solve` against EDM's deterministic Heun step written out here (Karras et al. 2022,
    Alg. 1 with γ = 0), per sample over its own index range (Euler steps differ by > 1e-3); then the
    (n_t, n_u, n_s) window, a finite loss with a DSM term and a short run."""
    teacher = FakeTeacher(data, analytic=True)
    m = _method(ctm, data, teacher, N=8, max_teacher_steps=3, mu=0.9)
    sig, D = m.sigmas, teacher.denoiser()
    x = torch.randn(3, 2) * 5
    n_from, n_to = torch.tensor([0, 2, 5]), torch.tensor([3, 3, 7])
    got = ctm.teacher_solve(D, x, sig, n_from, n_to, 3)
    for i in range(3):
        xi, x_euler = x[i:i + 1], x[i:i + 1]
        for n in range(int(n_from[i]), int(n_to[i])):
            t_cur, t_next = float(sig[n]), float(sig[n + 1])
            d = (xi - D(xi, t_cur)) / t_cur                    # Karras et al. 2022, Alg. 1 (γ = 0)
            x_next = xi + (t_next - t_cur) * d
            d_prime = (x_next - D(x_next, t_next)) / t_next     # t_next > 0 on this grid: the 2nd-order correction
            xi = xi + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
            x_euler = x_euler + (t_next - t_cur) * (x_euler - D(x_euler, t_cur)) / t_cur
        assert torch.allclose(got[i:i + 1], xi, atol=1e-5)
        assert not torch.allclose(got[i:i + 1], x_euler, atol=1e-3)    # the check tells Heun from Euler
    n_t, n_u, n_s = m.indices(4096, 3, "cpu")
    assert bool(((n_u - n_t == 3) & (n_u <= n_s) & (n_s <= 7)).all())
    loss, logs = m.loss("net", {"x": data.x[:64]}, 0)
    loss.backward()
    assert torch.isfinite(loss) and logs["dsm"] > 0 and 1 <= logs["k"] <= 3 and logs["dsm_balance"] > 0
    loop.train(m, TrainConfig(steps=20, batch_size=64, lr=1e-3), None, progress=False)
    assert torch.isfinite(ctm.sample(_loaded(m), torch.randn(100, 2), 2)).all()
    assert [g.name for g in m.groups()] == ["net"] and "disc" not in m.nets   # the GAN term: tests/test_gan.py
    with pytest.raises(ValueError, match="more than N − 1"):
        ctm.Config(N=8, max_teacher_steps=8)


def _p_weighted(K: int) -> np.ndarray:
    """sony/ctm's heun_step_strategy "weighted": p(k) = k / Σk on 1..K (transcribed, not ctm.p_k)."""
    return np.arange(1, K + 1) / (K * (K + 1) / 2)


def _draw_ks(m, n_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n_iter step counts k from the method's per-iteration draw, and their counts on 1..K."""
    torch.manual_seed(seed)
    ks = np.array([m.draw_k("cpu") for _ in range(n_iter)])
    return ks, np.bincount(ks, minlength=m.K + 1)[1:]


def test_ctm_step_count_is_drawn_per_iteration_with_p_k_proportional_to_k(data):
    """sony/ctm (`get_num_heun_step`, heun_step_strategy "weighted"): one k per iteration with
    p(k) ∝ k on 1..N − 1 by default (17 on the 18-level grid): the long jumps. χ² over 20000
    iterations; a uniform k (or the old per-sample window of at most 4 steps) fails the same bound."""
    m = _method(ctm, data, FakeTeacher(data, analytic=True))
    assert m.K == 17
    n_iter = 20000
    ks, counts = _draw_ks(m, n_iter, seed=0)
    p = _p_weighted(17)
    bound = _chi2_quantile(16)
    assert _chi2(counts, p) < bound
    assert 0.5 * np.abs(counts / n_iter - p).sum() < 0.02                       # total variation
    uniform = np.random.default_rng(0).multinomial(n_iter, np.full(17, 1 / 17))
    assert _chi2(uniform, p) > 10 * bound
    assert ks.mean() == pytest.approx((2 * 17 + 1) / 3, abs=0.1)                # E k = (2K + 1)/3


def test_ctm_uniform_step_law_draws_k_uniformly_on_1_to_K(data):
    """`k_law: uniform` (params/toy_ctm.yaml's `ctm` stage) is sony/ctm's heun_step_strategy "uniform",
    `np.random.randint(1, 1 + num_heun_step)`: every k in 1..K equally often, never 0 or K + 1. χ² over
    20000 iterations at K = 17 and at a capped K = 5; p(k) ∝ k fails the same bound."""
    for K in (None, 5):
        m = _method(ctm, data, FakeTeacher(data, analytic=True), k_law="uniform", max_teacher_steps=K)
        K = K or 17
        ks, counts = _draw_ks(m, 20000, seed=2)
        assert ks.min() == 1 and ks.max() == K
        bound = _chi2_quantile(K - 1)
        assert _chi2(counts, np.full(K, 1 / K)) < bound
        assert _chi2(counts, _p_weighted(K)) > 10 * bound


def test_ctm_times_follow_sony_ctm_given_k(data):
    """Given k, per sample n_t ~ U{0..N−1−k}, n_u = n_t + k and n_s ~ U{n_u..N−1} (sony/ctm's
    `sample_t` on N − k indices and `sample_s` = randint(n_t + k, N)): χ² of the (n_t, n_s) histogram
    against that joint law P(i, j) = 1/(N − k) · 1/(N − i − k)."""
    N, k, n = 18, 5, 40000
    m = _method(ctm, data, FakeTeacher(data, analytic=True), N=N)
    torch.manual_seed(1)
    n_t, n_u, n_s = m.indices(n, k, "cpu")
    assert torch.equal(n_u, n_t + k) and bool((n_s >= n_u).all() & (n_s <= N - 1).all())
    cells = [(i, j) for i in range(N - k) for j in range(i + k, N)]
    p = np.array([1 / (N - k) / (N - i - k) for i, j in cells])
    hist = {c: 0 for c in cells}
    for i, j in zip(n_t.tolist(), n_s.tolist()):
        hist[i, j] += 1
    assert _chi2(np.array([hist[c] for c in cells]), p) < _chi2_quantile(len(cells) - 1)


def test_ctm_target_inner_jump_uses_the_online_network(data):
    """The target is stopgrad G_θ⁻(G(x_u, u, s), s, σ_min) with the inner G by the online network
    (sony/ctm's ctm_target_inner_type "model_sg"); `target_inner: ema` uses θ⁻ for both jumps. At
    s = σ_min the outer jump is the identity, so the target is the inner jump alone."""
    teacher, eps = FakeTeacher(data, analytic=False), EDM().sigma_min
    x, u = torch.randn(64, 2), torch.rand(64) * 10 + 0.5
    s = u * torch.rand(64) * 0.5 + eps
    for inner in ("online", "ema"):
        m = _method(ctm, data, teacher, target_inner=inner)
        _randomise_output(m.nets["net"])
        at_min, general = m.target(x, u, eps), m.target(x, u, s)
        G_inner = m.G if inner == "online" else m.G_target
        assert torch.equal(at_min, G_inner(x, u, eps))
        assert torch.allclose(general, m.G_target(G_inner(x, u, s), s, eps))
        assert not at_min.requires_grad
        with torch.no_grad():                                            # move the EMA target only
            for q in m.nets["target"].parameters():
                q.add_(0.05 * torch.randn_like(q))
        moved = m.target(x, u, eps)
        if inner == "online":
            assert torch.equal(moved, at_min)                            # the EMA does not enter
        else:
            assert not torch.allclose(moved, at_min, atol=1e-3)


def test_ctm_dsm_levels_are_half_lognormal_half_upper_grid():
    """sony/ctm's HalfLogNormalHalfUniformSampler: the first half ln σ ~ N(−1.2, 1.2²), the rest at a
    continuous Karras position r ~ U[0, 0.7], σ = (σ_max^{1/7} + r·(σ_min^{1/7} − σ_max^{1/7}))^7.
    Kolmogorov–Smirnov bounds (α = 0.001) on both halves, and the share above σ = 5 against its
    closed form (the old all-log-normal law puts 1% there)."""
    noise, n = EDM(), 40000
    torch.manual_seed(0)
    sig = ctm.dsm_sigmas(n, noise, "half_uniform", 0.7).double()
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    normal_cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731

    def ks(values, cdf):
        v = values.sort().values
        emp = torch.arange(1, len(v) + 1, dtype=torch.float64) / len(v)
        return float((emp - cdf(v)).abs().max())

    half = n // 2
    assert ks(sig[:half].log(), lambda y: normal_cdf((y + 1.2) / 1.2)) < 1.95 / math.sqrt(half)
    r = (hi - sig[half:] ** (1 / 7)) / (hi - lo)
    assert ks(r, lambda q: (q / 0.7).clamp(0, 1)) < 1.95 / math.sqrt(n - half)
    assert sig[half:].min() >= (hi - 0.7 * (hi - lo)) ** 7 * (1 - 1e-5) and sig.max() <= 80 * (1 + 1e-6)
    r5 = (hi - 5 ** (1 / 7)) / (hi - lo)
    want = 0.5 * (r5 / 0.7) + 0.5 * (1 - float(normal_cdf(torch.tensor((math.log(5) + 1.2) / 1.2))))
    assert float((sig > 5).double().mean()) == pytest.approx(want, abs=0.01)
    assert float((ctm.dsm_sigmas(n, noise, "lognormal") > 5).double().mean()) < 0.02


def test_ctm_dsm_balance_gives_the_dsm_gradient_the_ctm_norm_at_the_last_layer(data):
    """Adaptive balance (sony/ctm `calculate_adaptive_weight` on the last layer W): the DSM term's
    gradient on W, measured as ∇_W L(dsm_weight = 1) − ∇_W L(dsm_weight = 0) under the same random
    draws, has the norm of the consistency loss's own gradient on W; with `dsm_balance: fixed` it does not."""
    teacher, batch, ratios = FakeTeacher(data, analytic=True), {"x": data.x[:128]}, {}
    for balance in ("adaptive", "fixed"):
        m = _method(ctm, data, teacher, N=8, init_from_teacher=False, dsm_balance=balance)
        grads = {}
        for w in (0.0, 1.0):
            m.cfg = m.cfg.model_copy(update={"dsm_weight": w})
            m.nets.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            m.loss("net", batch, 0)[0].backward()
            grads[w] = m.nets["net"].out.weight.grad.clone()
        ratios[balance] = ((grads[1.0] - grads[0.0]).norm() / grads[0.0].norm()).item()
    assert ratios["adaptive"] == pytest.approx(1.0, rel=1e-3)
    assert abs(ratios["fixed"] - 1.0) > 0.1, ratios


# ----------------------------------------------------------------------------- AYF

def test_flow_map_boundary_and_teacher_init(data):
    teacher = FakeTeacher(data, analytic=False)
    m = _method(ayf, data, teacher)
    net, noise = m.nets["net"], EDM()
    x, t, s = torch.randn(64, 2), torch.rand(64) * 0.9 + 0.05, torch.rand(64) * 0.05
    v = ayf.velocity(denoiser_in("fm", teacher.denoiser()), x, t)
    assert torch.allclose(ayf.F_theta(net, noise, x, t, s), v, atol=1e-4, rtol=1e-4)  # F_θ = v_teacher at init
    _randomise_output(net)
    assert torch.equal(ayf.flow_map(net, noise, x, t, t), x)          # f(x, t, t) = x exactly


def test_ayf_jvp_equals_finite_difference_float64():
    torch.manual_seed(0)
    net, noise = Net64(second_time=True, seed=2), EDM()
    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.8 + 0.1
    s = t * (0.3 + 0.7 * torch.rand(16, dtype=torch.float64))  # away from s ≈ 0, where the s label
    v = torch.randn(16, 2, dtype=torch.float64)                # ¼·ln σ(s) is too stiff for an ε = 1e-3 difference
    for tangents in [(v, torch.ones_like(t), torch.zeros_like(s)),                 # EMD: d/dt along the ODE
                     (torch.zeros_like(v), torch.zeros_like(t), torch.ones_like(s))]:  # LMD: ∂/∂s
        F, d = ayf.dF(net, noise, x, t, s, tangents, mode="func")
        h = 1e-6
        fp = ayf.F_theta(net, noise, *[p + h * q for p, q in zip((x, t, s), tangents)])
        fm = ayf.F_theta(net, noise, *[p - h * q for p, q in zip((x, t, s), tangents)])
        ref = (fp - fm) / (2 * h)
        assert ((d - ref).norm() / ref.norm()).item() < 1e-3
        assert torch.equal(F, ayf.F_theta(net, noise, x, t, s))
        _, fd = ayf.dF(net, noise, x, t, s, tangents, mode="fd", eps=1e-3)
        assert ((fd - ref).norm() / ref.norm()).item() < 1e-3


def test_ayf_tangents_vanish_at_the_exact_flow_map():
    """Data N(0, c²I) in FM time: the exact flow map is f*(x_t, t, s) = (std_s/std_t)·x_t,
    std_t² = t² + (1 − t)²c², so F* = (x_t − f*)/(t − s). With the exact teacher velocity (the exact
    EDM denoiser through denoiser_in("fm")), both the EMD and the LMD tangents (r = 1) are zero."""
    c = 0.7
    std = lambda t: torch.sqrt(t * t + (1 - t) ** 2 * c * c)  # noqa: E731

    def F_star(x, t, s):
        return (x - (std(s) / std(t))[:, None] * x) / (t - s)[:, None]

    D_fm = denoiser_in("fm", lambda x, sig, **k: c**2 / (c**2 + sig.reshape(-1, 1) ** 2) * x)
    x = torch.randn(32, 3, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64) * 0.8 + 0.15
    s = t * torch.rand(32, dtype=torch.float64) * 0.9
    v = ayf.velocity(D_fm, x, t)
    F, dF_dt = jvp(F_star, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    assert ayf.tangent_emd(F, v, dF_dt, t, s, 1.0).abs().max().item() < 1e-10
    F, dF_ds = jvp(F_star, (x, t, s), (torch.zeros_like(x), torch.zeros_like(t), torch.ones_like(s)))
    f = x + (s - t)[:, None] * F
    assert ayf.tangent_lmd(F, ayf.velocity(D_fm, f, s), dF_ds, t, s, 1.0).abs().max().item() < 1e-10
    assert ayf.tangent_emd(1.1 * F, v, dF_dt, t, s, 1.0).abs().max().item() > 1e-2


@pytest.mark.parametrize("objective", ["emd", "lmd"])
def test_ayf_loss_and_short_run(data, objective):
    """The AYF gradient is the small-step limit of a discrete flow-map consistency gradient: on data
    N(0, c²I) with the exact teacher, the exact PF-ODE x_s = (std_s/std_t)·x_t (std_t² = t² + (1 − t)²c²)
    gives the discrete targets stopgrad f_θ(x_{t−Δ}, t − Δ, s) (EMD: the map is constant along the ODE) and
    stopgrad (std_s/std_{s+Δ})·f_θ(x_t, t, s + Δ) (LMD: the map's end follows the ODE); at fixed (t, s)
    and with a constant normalisation (c → ∞, r = r_max) the loss's gradient on θ points as the gradient
    of E‖f_θ(x_t, t, s) − target‖² built from f_θ alone (independent draws, cosine > 0.95).
    Then a backward pass, a short run and sampling stay finite."""
    c, B, dt, noise = 0.7, 2048, 1e-3, EDM()
    std = lambda t: torch.sqrt(t * t + (1 - t) ** 2 * c * c)  # noqa: E731
    for t0, s0 in ((0.7, 0.2), (0.3, 0.1)):
        m = _method(ayf, data, FakeTeacher(data, analytic=True), objective=objective, init_from_teacher=False,
                    warmup_steps=0, tangent_c=1e3)
        m.D_fm = denoiser_in("fm", lambda x, sig, **k: c**2 / (c**2 + sig.reshape(-1, 1) ** 2) * x)
        t, s = torch.full((B,), t0), torch.full((B,), s0)
        m.sample_ts = lambda n, device: (t, s)                          # every sample at (t0, s0)
        net = m.nets["net"]
        _randomise_output(net)
        torch.manual_seed(0)
        x0 = c * torch.randn(B, 2)
        g_ayf = _flat_grad(net, m.loss("net", {"x": x0}, 0)[0])
        x_t = (1 - t)[:, None] * x0 + t[:, None] * torch.randn(B, 2)
        with torch.no_grad():
            if objective == "emd":
                target = ayf.flow_map(net, noise, (std(t - dt) / std(t))[:, None] * x_t, t - dt, s)
            else:
                target = (std(s) / std(s + dt))[:, None] * ayf.flow_map(net, noise, x_t, t, s + dt)
        g_discrete = _flat_grad(net, (ayf.flow_map(net, noise, x_t, t, s) - target).pow(2).sum(1).mean())
        assert _cosine(g_ayf, g_discrete) > 0.95, (t0, s0)
    m = _method(ayf, data, FakeTeacher(data, analytic=True), objective=objective, init_from_teacher=False,
                warmup_steps=20)
    loss, _ = m.loss("net", {"x": data.x[:64]}, 1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.nets.parameters() if p.grad is not None)
    m.nets.zero_grad()
    loop.train(m, TrainConfig(steps=30, batch_size=64, lr=1e-3), None, progress=False)
    for nfe in (1, 3):
        assert torch.isfinite(ayf.sample(_loaded(m), torch.randn(100, 2), nfe)).all()
    assert m.cfg.r_max < 1


@pytest.mark.parametrize("objective", ["emd", "lmd"])
def test_ayf_diagonal_share_of_the_batch_has_s_equal_t(data, objective):
    torch.manual_seed(0)
    m = _method(ayf, data, FakeTeacher(data, analytic=True), objective=objective, init_from_teacher=False,
                diagonal=0.25)
    t, s = m.sample_ts(20000, "cpu")
    assert (s <= t).all() and abs((s == t).double().mean().item() - 0.25) < 0.02
    m0 = _method(ayf, data, FakeTeacher(data, analytic=True), objective=objective, init_from_teacher=False)
    t, s = m0.sample_ts(20000, "cpu")
    assert (s == t).sum() == 0


def test_ayf_autoguided_teacher_needs_a_guide(data):
    teacher = FakeTeacher(data, analytic=False)
    with pytest.raises(ValueError, match="guide"):
        _method(ayf, data, teacher, guidance=2.0)
    guide = FakeTeacher(data, analytic=False, seed=1)
    m = ayf.Method(ayf.Config(guidance=2.0), Context(data, EDM(), None, {"teacher": teacher, "guide": guide}))
    x, t = torch.randn(8, 2), torch.rand(8) * 0.8 + 0.1
    v_main = ayf.velocity(denoiser_in("fm", teacher.denoiser()), x, t)
    v_weak = ayf.velocity(denoiser_in("fm", guide.denoiser()), x, t)
    assert torch.allclose(ayf.velocity(m.D_fm, x, t), 2.0 * v_main + (1 - 2.0) * v_weak, atol=1e-4)


# ----------------------------------------------------------------------------- 1D Gaussian (docs/methods.md §3)

def test_gaussian_exact_maps_are_exact_at_every_step_count():
    """With the exact optimum, CM multistep is exact in distribution too (each re-noised input has
    the right marginal), so any degradation with steps comes from model error, not from f*."""
    for n in (1, 2, 3, 4, 8, 16, 64):
        assert ayf.gaussian_cm_multistep_w2(ayf.gaussian_optimal_cm, n) < 1e-12
        assert ayf.gaussian_flow_map_w2(ayf.gaussian_flow_map, n) < 1e-12
    x = torch.randn(5)
    assert torch.allclose(ayf.gaussian_flow_map(x, 0.7, 0.0), ayf.gaussian_optimal_cm(x, 0.7))


def test_gaussian_imperfect_cm_degrades_with_steps_flow_map_does_not():
    """The same relative error δ in F for both (an error of a jump scales with its length t − s):
    CM multistep re-traverses the low-noise region at every step, so its W2 rises again beyond a
    few steps without bound; the flow map covers [0, 1] once and its W2 never rises."""
    d = 0.1
    cm = lambda x, t: ayf.gaussian_perturbed_cm(x, t, 0.5, d)  # noqa: E731
    fmap = lambda x, t, s: ayf.gaussian_perturbed_flow_map(x, t, s, 0.5, d)  # noqa: E731
    steps = [1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64]
    w_cm = [ayf.gaussian_cm_multistep_w2(cm, n) for n in steps]
    w_fm = [ayf.gaussian_flow_map_w2(fmap, n) for n in steps]
    best = steps[w_cm.index(min(w_cm))]
    assert best <= 6
    tail = w_cm[steps.index(6):]
    assert all(b > a for a, b in zip(tail, tail[1:]))                  # rises beyond a few steps
    assert w_cm[-1] > w_cm[1]                                          # 64 steps worse than 2
    assert all(b <= a + 1e-12 for a, b in zip(w_fm, w_fm[1:]))         # flow map never gets worse
    assert w_fm[-1] < w_cm[-1]
    # an error in the output x̂0 instead (f = 1.02·f*): W2 rises from the first step on
    w_out = [ayf.gaussian_cm_multistep_w2(lambda x, t: ayf.gaussian_scaled_cm(x, t, 0.5, 0.02), n) for n in steps]
    assert all(b > a for a, b in zip(w_out, w_out[1:])) and w_out[-1] > 5 * w_out[0]
    # Monte-Carlo check of the closed form (CM, 16 steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=g, dtype=torch.float64)
    times = ayf.uniform_times(16)
    x0 = cm(x, times[0])
    for t in times[1:]:
        x0 = cm((1 - t) * x0 + t * torch.randn(x.shape, generator=g, dtype=torch.float64), t)
    assert abs(abs(x0.std().item() - 0.5) - w_cm[steps.index(16)]) < 3e-3


# ----------------------------------------------------------------------------- artifacts

def test_real_teacher_save_load_and_sample_every_method(data, tmp_path):
    """With a saved-and-loaded EDM teacher (a real LoadedModel): each method builds, takes a few
    loop steps, saves and loads back bit-exactly; its 1-NFE sample is the consistency function at
    (σ_max·z, σ_max) (docs/methods.md §1: one step of the multistep sampler is f(τ_0·z, τ_0)), and
    that function meets the boundary condition f(x, σ_min) = x (exactly for CT and CTM, up to
    O(σ_min) for sCM and AYF, whose own boundary is at σ = 0)."""
    from fastgen_core.methods import edm
    from fastgen_core.models import load_model, save_model

    def save_and_load(method, states, name):
        out = tmp_path / name
        out.mkdir()
        save_model(out, method.cfg.name, method.cfg, method.net_cfgs, states, data.shape, data.num_classes,
                   method.ctx.noise, method.meta())
        return load_model(out)

    cfg = TrainConfig(steps=5, batch_size=32, lr=1e-3)
    t = edm.Method(edm.Config(), Context(data, EDM(), NCFG))
    teacher = save_and_load(t, loop.train(t, cfg, None, progress=False), "teacher")
    cases = {"ct": (ct, dict(K=5), None, NCFG), "scd": (scm, {}, teacher, None),
             "sct": (scm, dict(variant="sct", c_noise="t", init_from_teacher=False), None, NCFG),
             "ctm": (ctm, dict(gamma=0.5), teacher, None), "ayf": (ayf, dict(objective="lmd"), teacher, None)}
    for name, (mod, kw, teach, net) in cases.items():
        m = _method(mod, data, teach, network=net, **kw)
        states = loop.train(m, cfg, None, progress=False)
        model = save_and_load(m, states, name)
        assert model.meta["method"] == mod.__name__.rsplit(".", 1)[-1]
        for k, sd in states.items():
            got = model.nets[k].state_dict()
            assert sd.keys() == got.keys() and all(torch.equal(sd[p], got[p]) for p in sd), (name, k)
        f = mod.consistency_fn(model)                                   # for fastgen_core.editing
        z, s_max, s_min = torch.randn(64, 2), EDM().sigma_max, EDM().sigma_min
        with torch.no_grad():
            x1 = model.sample(z, 1)
            assert torch.allclose(x1, f(s_max * z, torch.full((64,), s_max)), atol=1e-4), name
            x = torch.randn(64, 2)
            tol = 1e-6 if name in ("ct", "ctm") else 1e-3  # measured 4-5e-5: σ_min·|F|
            assert torch.allclose(f(x, torch.full((64,), s_min)), x, atol=tol), name
            x2 = model.sample(z, 2)
        assert x2.shape == (64, 2) and torch.isfinite(x2).all() and not torch.allclose(x1, x2), name
