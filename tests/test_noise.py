"""Noise processes (fastgen_core/noise.py): conversions between time conventions, the forward
processes against the papers' formulas, denoiser/velocity conversions against closed forms on
Gaussian data, grids, training-time samplers, validation, and the older string-keyed API."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from fastgen_core import noise as N
from fastgen_core.config import Strict
from fastgen_core.noise import (CAF, EDM, FM, PROCESSES, Flow, NoiseProcess, TrigFlow, VPCosine, col,
                                load_process)

SD = 0.5  # σ_d of the defaults
ALL = [EDM(), TrigFlow(), Flow(), FM(), CAF(), VPCosine()]
FLOWS = [p for p in ALL if p.process in ("trigflow", "flow", "fm", "caf")]
ids = lambda ps: [p.process for p in ps]  # noqa: E731

# Interior times of each process (finite, nonzero noise), written by hand.
TIMES = {"edm": [0.01, 0.5, 3.0, 40.0], "trigflow": [0.02, 0.7, 1.2, 1.5], "flow": [0.05, 0.3, 0.7, 0.98],
         "fm": [0.02, 0.3, 0.7, 0.95], "caf": [0.05, 0.3, 0.7, 0.98], "vp_cosine": [0.02, 0.3, 0.7, 0.97]}


def times(p) -> torch.Tensor:
    return torch.tensor(TIMES[p.process], dtype=torch.float64)


def paper_forward(p, x0, t, eps):
    """Each paper's forward process, written out here (x0: data, eps: standard normal)."""
    t = col(t, x0)
    if p.process == "edm":
        return x0 + t * eps
    if p.process == "trigflow":
        return torch.cos(t) * x0 + torch.sin(t) * (SD * eps)  # z ~ N(0, σ_d²)
    if p.process == "flow":
        return t * x0 + (1 - t) * eps  # t = 1 data
    if p.process == "fm":
        return (1 - t) * x0 + t * eps  # t = 1 noise
    if p.process == "caf":  # CAF: noise at t = 0, data x1 at t = 1, true initial velocity v0
        x1, z, h = x0, eps, p.h
        v0 = h * (x1 - z)
        return (1 - t**2) * z + t**2 * x1 + v0 * (t - t**2)
    g = torch.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2
    return g.sqrt() * x0 + (1 - g).sqrt() * eps


# ----------------------------------------------------------------------------- conversions between processes

@pytest.mark.parametrize("Q", ALL, ids=ids(ALL))
@pytest.mark.parametrize("P", ALL, ids=ids(ALL))
def test_time_round_trip_and_forward_agree_at_matched_noise(P, Q):
    t_P = times(P)
    a_P, sigma = P.to_edm(t_P)
    t_Q = Q.from_edm(sigma)
    a_Q, sigma_Q = Q.to_edm(t_Q)
    assert torch.allclose(sigma_Q, sigma, rtol=1e-10)
    assert torch.allclose(P.from_edm(sigma_Q), t_P, rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(4, 3, dtype=torch.float64, generator=g)
    x_P, x_Q = P.forward(x0, t_P, eps), Q.forward(x0, t_Q, eps)
    assert torch.allclose(x_P / col(a_P, x0), x_Q / col(a_Q, x0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("P", ALL + [CAF(h=0.5), CAF(h=2.0)], ids=ids(ALL) + ["caf_h0.5", "caf_h2"])
def test_forward_is_the_papers_formula(P):
    t = times(P)
    x0, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(P.forward(x0, t, eps), paper_forward(P, x0, t, eps), rtol=1e-12, atol=1e-12)
    a, sigma = P.to_edm(t)  # and x_t = a·(x0 + σ·ε) with the (a, σ) of to_edm
    assert torch.allclose(col(a, x0) * (x0 + col(sigma, x0) * eps), paper_forward(P, x0, t, eps), atol=1e-9)


@pytest.mark.parametrize("P", ALL, ids=ids(ALL))
def test_denoiser_conversions_round_trip(P):
    D_edm = lambda x, s, **k: torch.tanh(x) / col(1 + s, x) + k["shift"]  # noqa: E731 (any x0-predictor)
    D_own = lambda x, t, **k: torch.sin(x) * col(t, x) - k["shift"]  # noqa: E731
    t = times(P)
    a, sigma = P.to_edm(t)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(P.to_edm_denoiser(P.from_edm_denoiser(D_edm))(x, sigma, shift=0.3), D_edm(x, sigma, shift=0.3))
    assert torch.allclose(P.from_edm_denoiser(P.to_edm_denoiser(D_own))(x, t, shift=0.3), D_own(x, t, shift=0.3))
    # the wrapped EDM denoiser sees x_t/a at σ(t)
    seen = {}
    P.from_edm_denoiser(lambda x_s, s: seen.update(x=x_s, s=s) or x_s)(x, t)
    assert torch.allclose(seen["x"], x / col(a, x)) and torch.allclose(seen["s"], sigma)


@pytest.mark.parametrize("P", FLOWS, ids=ids(FLOWS))
def test_velocity_and_x0_conversions_are_inverse(P):
    t = times(P)
    x_t, x0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(P.velocity_to_x0(x_t, t, P.x0_to_velocity(x_t, t, x0)), x0, atol=1e-9)


# ----------------------------------------------------------------------------- closed forms on Gaussian data

C = 0.7  # data ~ N(0, C²) per coordinate, independent of the noise


def D_edm_star(x, sigma, **_):
    """The optimal EDM denoiser for data N(0, C²): E[x0 | x0 + σ·ε = x] = C²/(C² + σ²)·x."""
    return C**2 / (C**2 + col(sigma, x) ** 2) * x


def regress(cov, var, x_t):
    """E[v | x_t] for jointly Gaussian zero-mean (v, x_t): Cov(v, x_t)/Var(x_t)·x_t."""
    return col(cov / var, x_t) * x_t


def velocity_star(P, x_t, t):
    """The optimal velocity of each flow-type process, written from its paper's definitions:
    x_t = A·data + B·noise and v = Ad·data + Bd·noise give Cov(v, x_t) = Ad·A·C² + Bd·B·Var(noise)."""
    if P.process == "flow":  # x_t = t·x1 + (1−t)·z0, v = x1 − z0
        return regress(t * C**2 - (1 - t), t**2 * C**2 + (1 - t) ** 2, x_t)
    if P.process == "fm":  # x_t = (1−t)·x0 + t·ε, v = ε − x0
        return regress(t - (1 - t) * C**2, (1 - t) ** 2 * C**2 + t**2, x_t)
    if P.process == "trigflow":  # x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d²); sCM target σ_d·F = cos t·z − sin t·x0
        c, s = torch.cos(t), torch.sin(t)
        F = regress((c * s * SD**2 - s * c * C**2) / SD, c**2 * C**2 + s**2 * SD**2, x_t)
        return SD * F  # the velocity dx_t/dt is σ_d·F
    # caf: x_t = (1−t²)·z + t²·x1 + v0·(t − t²) with the true v0 = h·(x1 − z)
    h = P.h
    A, B = t**2 + h * (t - t**2), (1 - t**2) - h * (t - t**2)
    return regress(h * (A * C**2 - B), A**2 * C**2 + B**2, x_t)


@pytest.mark.parametrize("P", FLOWS + [CAF(h=1.0), CAF(h=0.4)], ids=ids(FLOWS) + ["caf_h1", "caf_h0.4"])
def test_optimal_velocity_gives_the_optimal_edm_denoiser(P):
    D_own = lambda x_t, t, **k: P.velocity_to_x0(x_t, t, velocity_star(P, x_t, t))  # noqa: E731
    D_edm = P.to_edm_denoiser(D_own)
    sigma = torch.tensor([0.02, 0.3, 1.0, 5.0, 50.0], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(D_edm(x, sigma), D_edm_star(x, sigma), rtol=1e-7, atol=1e-9)
    # and back: the optimal EDM denoiser, moved into P, gives the optimal velocity
    t = P.from_edm(sigma)
    x_t = col(P.to_edm(t)[0], x) * x
    v = P.x0_to_velocity(x_t, t, P.from_edm_denoiser(D_edm_star)(x_t, t))
    assert torch.allclose(v, velocity_star(P, x_t, t), rtol=1e-7, atol=1e-7)


def alpha_beta_literal(P, t):
    """(weight of data, weight of standard-normal noise) of each process, written out here."""
    return {"edm": lambda: (torch.ones_like(t), t), "trigflow": lambda: (torch.cos(t), SD * torch.sin(t)),
            "flow": lambda: (t, 1 - t), "fm": lambda: (1 - t, t),
            "caf": lambda: (t**2 + 1.5 * (t - t**2), 1 - t**2 - 1.5 * (t - t**2)),
            "vp_cosine": lambda: (torch.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2),
                                  torch.sin((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2))}[P.process]()


@pytest.mark.parametrize("P", ALL, ids=ids(ALL))
def test_edm_optimal_denoiser_is_the_posterior_mean_in_every_process(P):
    t = times(P)
    alpha, beta = alpha_beta_literal(P, t)
    x_t = torch.randn(4, 3, dtype=torch.float64)
    want = col(alpha * C**2 / (alpha**2 * C**2 + beta**2), x_t) * x_t  # E[x0 | α·x0 + β·ε = x_t]
    assert torch.allclose(P.from_edm_denoiser(D_edm_star)(x_t, t), want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- grids and training times

@pytest.mark.parametrize("n_steps", [1, 4, 17])
@pytest.mark.parametrize("P", ALL, ids=ids(ALL))
def test_grid_runs_monotonically_from_noise_to_data(P, n_steps):
    g = P.grid(n_steps)
    assert g.shape == (n_steps + 1,) and g.dtype == torch.float64
    assert g[0].item() == P.t_noise and g[-1].item() == P.t_data
    step = (g[1:] - g[:-1]) * (1 if P.t_data > P.t_noise else -1)
    assert bool((step > 0).all())
    sigma = P.to_edm(g)[1]
    assert bool((sigma[1:] < sigma[:-1]).all()) and sigma[-1].item() == pytest.approx(0, abs=1e-3)


def test_grids_are_the_papers_grids():
    e, n = EDM(), 6
    assert torch.equal(e.grid(n), torch.tensor(e.karras_sigmas(n).tolist() + [0.0], dtype=torch.float64))
    i = torch.arange(n, dtype=torch.float64)
    rf = torch.cat([i / n * (1 - 1e-3) + 1e-3, torch.ones(1, dtype=torch.float64)])
    assert torch.allclose(Flow().grid(n), rf) and torch.allclose(FM().grid(n), 1 - rf)
    assert torch.allclose(CAF().grid(n), torch.arange(n + 1, dtype=torch.float64) / n)
    assert torch.allclose(VPCosine().grid(n), 1 - torch.arange(n + 1, dtype=torch.float64) / n)
    karras = torch.tensor([(80 ** (1 / 7) + k / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for k in range(n)])
    assert torch.allclose(e.karras_sigmas(n), karras, rtol=1e-6)
    assert torch.allclose(TrigFlow().grid(n), torch.cat([torch.atan(karras.double() / SD), torch.zeros(1)]).double(),
                          rtol=1e-6)
    assert TrigFlow().t_noise == pytest.approx(math.atan(80 / SD))


n_draws = 100_000
# (process, statistic of the draw, expected mean, expected std, support)
SAMPLERS = [
    (EDM(), lambda t: t.log(), -1.2, 1.2, (0, math.inf)),
    (TrigFlow(), lambda t: (SD * t.tan()).log(), -1.0, 1.4, (0, math.pi / 2)),
    (Flow(), lambda t: t, (1 + 1e-3) / 2, (1 - 1e-3) / math.sqrt(12), (1e-3, 1)),
    (FM(), lambda t: t, (1 - 1e-3) / 2, (1 - 1e-3) / math.sqrt(12), (0, 1 - 1e-3)),
    (CAF(), lambda t: t, 0.5, math.sqrt((1001**2 - 1) / 12) / 1000, (0, 1)),
    (VPCosine(), lambda t: t, 0.5, 1 / math.sqrt(12), (0, 1)),
]


@pytest.mark.parametrize("P,stat,mean,std,support", SAMPLERS, ids=[s[0].process for s in SAMPLERS])
def test_training_times_follow_the_documented_distribution(P, stat, mean, std, support):
    t = P.sample_t(n_draws, generator=torch.Generator().manual_seed(1))
    assert t.shape == (n_draws,) and bool(torch.isfinite(t).all())
    assert support[0] <= t.min().item() and t.max().item() <= support[1]
    v = stat(t.double())
    assert abs(v.mean().item() - mean) < 5 * std / math.sqrt(n_draws)
    assert v.std().item() == pytest.approx(std, rel=0.02)


def test_caf_training_times_are_the_thousandths():
    t = CAF().sample_t(n_draws, generator=torch.Generator().manual_seed(2))
    k = t * 1000
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert set(k.round().long().unique().tolist()) == set(range(1001))


def test_edm_sampler_is_unchanged():
    e = EDM()
    got = e.sample_sigma(64, generator=torch.Generator().manual_seed(3))
    want = (-1.2 + 1.2 * torch.randn(64, generator=torch.Generator().manual_seed(3))).exp()
    assert torch.equal(got, want)
    assert torch.equal(e.sample_t(64, generator=torch.Generator().manual_seed(3)), want)


# ----------------------------------------------------------------------------- CAF, validation, recipe field

def test_caf_with_h_one_is_rectified_flow():
    caf, flow = CAF(h=1.0), Flow()
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    assert torch.equal(caf.kappa(t), t)
    for got, want in zip(caf.to_edm(t), flow.to_edm(t)):
        assert torch.allclose(got, want, rtol=1e-12)
    sigma = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64)
    assert torch.allclose(caf.from_edm(sigma), flow.from_edm(sigma), rtol=1e-12)
    x, v = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    assert torch.allclose(caf.velocity_to_x0(x, t, v), flow.velocity_to_x0(x, t, v))


@pytest.mark.parametrize("h", [-0.5, 0.0, 2.01, 3.0])
def test_caf_rejects_non_monotone_h(h):
    with pytest.raises(ValidationError, match="0 < h ≤ 2"):
        CAF(h=h)


@pytest.mark.parametrize("h", [0.3, 1.5, 2.0])
def test_caf_from_edm_inverts_for_every_valid_h(h):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    caf = CAF(h=h)
    assert bool((caf.kappa(t)[1:] > caf.kappa(t)[:-1]).all())
    assert torch.allclose(caf.from_edm(caf.to_edm(t)[1]), t, atol=1e-7)


def test_bad_settings_are_rejected():
    for bad in (lambda: EDM(sigma_min=1.0, sigma_max=0.5), lambda: EDM(sigma_max=-1.0), lambda: VPCosine(s=1e-3, d=0.0),
                lambda: Flow(eps_t=0.0), lambda: EDM(sigmax=80.0), lambda: TrigFlow(P_std=0.0)):
        with pytest.raises(ValidationError):
            bad()
    e = EDM()
    with pytest.raises(ValidationError):
        e.sigma_max = 3.0  # frozen
    assert hash(e) == hash(EDM()) and EDM(sigma_max=80.0) == e


def test_noise_process_field_reads_old_and_new_recipes():
    ta = TypeAdapter(NoiseProcess)
    old = ta.validate_python({"sigma_max": 80})
    assert type(old) is EDM and old.sigma_max == 80.0
    assert type(ta.validate_python({"process": "flow"})) is Flow
    assert ta.validate_python({"process": "caf", "h": 2}).h == 2.0
    with pytest.raises(ValidationError) as err:
        ta.validate_python({"process": "ddpm"})
    for name in PROCESSES:
        assert repr(name) in str(err.value)
    with pytest.raises(ValidationError):
        ta.validate_python({"process": "flow", "sigma_max": 80})  # a field of another process

    class Recipe(Strict):
        noise: NoiseProcess = EDM()
    assert Recipe.model_validate({"noise": {"sigma_max": 5.0}}).noise == EDM(sigma_max=5.0)
    assert Recipe().noise == EDM()


@pytest.mark.parametrize("P", ALL + [EDM(sigma_max=5.0), CAF(h=1.0)])
def test_load_process_reads_model_json(P):
    assert set(PROCESSES) == {"edm", "trigflow", "flow", "fm", "caf", "vp_cosine"}
    assert PROCESSES[P.process] is type(P)
    assert load_process(P.model_dump()) == P
    assert load_process(dict(P.__dict__)) == P


def test_load_process_reads_old_model_json():
    old = {"sigma_min": 0.002, "sigma_max": 20.0, "rho": 7.0, "sigma_data": 0.5, "P_mean": -1.2, "P_std": 1.2}
    assert load_process(old) == EDM(sigma_max=20.0)
    assert load_process(None) == EDM() and load_process({}) == EDM()


# ----------------------------------------------------------------------------- the string-keyed API, unchanged

def _old_to_edm(conv, t, sd=0.5):
    """The formulas of the string-keyed API before the process classes, copied literally."""
    t = torch.as_tensor(t, dtype=torch.float64 if torch.is_tensor(t) and t.dtype == torch.float64 else torch.float32)
    if conv == "edm":
        return torch.ones_like(t), t
    if conv == "trigflow":
        return torch.cos(t), sd * torch.tan(t)
    if conv == "fm":
        return 1 - t, t / (1 - t)
    g = torch.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2
    return g.sqrt(), ((1 - g) / g).sqrt()


def _old_from_edm(conv, sigma, sd=0.5):
    sigma = torch.as_tensor(sigma)
    if conv == "edm":
        return sigma
    if conv == "trigflow":
        return torch.atan(sigma / sd)
    if conv == "fm":
        return sigma / (1 + sigma)
    g = 1 / (1 + sigma**2)
    return torch.acos(g.sqrt()) * 2 / math.pi * (1 + 2.5e-4) - 2e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conv", ["edm", "trigflow", "fm", "vp"])
def test_string_keyed_api_is_bit_identical(conv, dtype):
    t = {"edm": [0.01, 1.0, 50.0], "trigflow": [0.01, 0.7, 1.5], "fm": [0.01, 0.5, 0.98], "vp": [0.02, 0.5, 0.95]}[conv]
    t = torch.tensor(t, dtype=dtype)
    for sd in (0.5, 0.3):
        for got, want in zip(N.to_edm(conv, t, sd), _old_to_edm(conv, t, sd)):
            assert got.dtype == want.dtype and torch.equal(got, want)
        sigma = torch.tensor([0.002, 0.4, 3.0, 80.0], dtype=dtype)
        assert torch.equal(N.from_edm(conv, sigma, sd), _old_from_edm(conv, sigma, sd))
        x = torch.randn(3, 2, dtype=dtype)
        D_edm = lambda x_s, s, **k: x_s * col(s, x_s) + k.get("y", 0)  # noqa: E731
        a, s = _old_to_edm(conv, t, sd)
        assert torch.equal(N.denoiser_in(conv, D_edm, sd)(x, t, y=1.0), D_edm(x / col(a, x), s, y=1.0))
    assert torch.equal(N.to_edm(conv, 0.3)[1], _old_to_edm(conv, 0.3)[1])  # a python float time
    assert torch.equal(N.vp_gamma(t), torch.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2)
    with pytest.raises(ValueError, match="unknown time convention"):
        N.to_edm("ve", t)


def test_edm_preconditioning_and_helpers_unchanged():
    e, s = EDM(), torch.tensor([0.01, 0.5, 10.0])
    c_skip, c_out, c_in, c_noise = e.precond(s)
    assert torch.equal(c_skip, 0.25 / (s**2 + 0.25)) and torch.equal(c_out, s * 0.5 / (s**2 + 0.25).sqrt())
    assert torch.equal(c_in, 1 / (s**2 + 0.25).sqrt()) and torch.equal(c_noise, s.log() / 4)
    assert torch.equal(e.loss_weight(s), (s**2 + 0.25) / (s * 0.5) ** 2)
    assert col(torch.arange(3.0), torch.zeros(3, 4, 5)).shape == (3, 1, 1)
    net = torch.nn.Linear(2, 2)
    D = e.denoiser(lambda x, c, **k: net(x))
    assert isinstance(D, N.EDMDenoiser) and D.edm is e
