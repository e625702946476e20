"""Analog Bits (docs/methods.md §7): bit codes, the VP cosine schedule, asymmetric time intervals,
self-conditioning in training and sampling, the value-histogram metric.

Reference values are transcribed from the authors' public code (google-research/pix2seq:
`models/diffusion_utils.py` for the schedule, the sampler's time steps and its DDPM transition,
`models/image_discrete_diffusion_model.py` for the Gray code and the 8-bit permutation), not from
this project's implementation."""
from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch

from fastgen_core import metrics as M
from fastgen_core.bits import BitCoder, dequantize, n_bits, quantize
from fastgen_core.config import NetworkConfig, TrainConfig
from fastgen_core.data import Dataset
from fastgen_core.methods import bits as B
from fastgen_core.methods.base import Context
from fastgen_core.models import LoadedModel, load_model, save_model
from fastgen_core.noise import VPCosine

torch.set_num_threads(1)
CODES = ("binary", "gray", "perm")


# ----------------------------------------------------------------------------- codes

@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("levels", [2, 5, 16, 256])
def test_encode_decode_is_lossless_for_every_value(code, levels):
    c = BitCoder(levels, code, b_scale=0.5)
    g = torch.Generator().manual_seed(levels)
    v = torch.stack([torch.randperm(levels, generator=g) for _ in range(6)]).reshape(2, 3, levels, 1)
    a = c.encode(v)
    assert a.shape == (2, 3 * n_bits(levels), levels, 1)
    assert set(a.unique().tolist()) <= {-0.5, 0.5}
    assert torch.equal(c.decode(a), v)
    # decoding thresholds at 0: any perturbation that keeps the signs decodes the same
    assert torch.equal(c.decode(a * (0.01 + torch.rand(a.shape, generator=g))), v)
    vec = torch.randint(levels, (7, 3), generator=g)  # vectors (N, D) too: (N, D·n)
    assert c.encode(vec).shape == (7, 3 * n_bits(levels)) and torch.equal(c.decode(c.encode(vec)), vec)


def test_binary_layout_is_msb_first_per_channel():
    c = BitCoder(16, "binary")
    v = torch.tensor([5, 12]).reshape(1, 2, 1, 1)  # 5 = 0101, 12 = 1100
    assert c.encode(v).flatten().tolist() == [-1, 1, -1, 1, 1, 1, -1, -1]


def _authors_gray_codes(n):
    """The authors' recursive construction (GrayCode.gen_gray_codes): reflect and set the top bit."""
    if n == 1:
        return [0, 1]
    shorter = _authors_gray_codes(n - 1)
    return shorter + [(1 << (n - 1)) | g for g in reversed(shorter)]


@pytest.mark.parametrize("bits", range(1, 9))
def test_gray_code_is_the_authors_and_adjacent_values_differ_in_one_bit(bits):
    c = BitCoder(2**bits, "gray")
    assert c.table.tolist() == _authors_gray_codes(bits)
    a = c.encode(torch.arange(2**bits).reshape(-1, 1, 1, 1)).flatten(1)
    assert ((a[1:] != a[:-1]).sum(1) == 1).all()
    # plain binary does not have this property (e.g. 7 -> 8 flips four bits)
    if bits >= 2:
        ab = BitCoder(2**bits, "binary").encode(torch.arange(2**bits).reshape(-1, 1, 1, 1)).flatten(1)
        assert (ab[1:] != ab[:-1]).sum(1).max() == bits


def test_permutation_code_is_the_authors_8bit_table():
    """np.random.seed(42); shuffle(arange(256)): the authors' 'uint8_s' perm and inv_perm tables."""
    c = BitCoder(256, "perm", seed=42)
    assert c.table[:13].tolist() == [228, 6, 79, 206, 117, 185, 242, 167, 9, 30, 180, 222, 230]
    assert c.table[-9:].tolist() == [255, 20, 188, 71, 106, 14, 92, 179, 102]
    assert c.inverse[:13].tolist() == [121, 233, 122, 173, 140, 83, 1, 185, 194, 8, 28, 135, 94]
    assert c.inverse[-9:].tolist() == [116, 226, 162, 136, 103, 214, 26, 129, 247]
    assert sorted(c.table.tolist()) == list(range(256))
    assert BitCoder(16, "perm", seed=7).table.tolist() != BitCoder(16, "perm", seed=8).table.tolist()


def test_quantisation_digits_4_bits_images_8_bits():
    x = torch.cat([torch.tensor([-1.0, 1.0]), torch.rand(1000, generator=torch.Generator().manual_seed(6)) * 2 - 1])
    x = x.reshape(1, 1, 1, -1)
    v = quantize(x, 16)
    assert v.min() == 0 and v.max() == 15
    back = dequantize(v, 16)  # the nearest of the 16 levels 2k/15 − 1
    grid = torch.arange(16) * 2 / 15 - 1
    nearest = grid[(x.reshape(-1, 1) - grid).abs().argmin(1)]
    assert torch.allclose(back.flatten(), nearest, atol=1e-6)
    assert BitCoder(16).shape((1, 8, 8)) == (4, 8, 8)
    assert BitCoder(256).shape((3, 32, 32)) == (24, 32, 32)
    u8 = torch.arange(256).reshape(1, 1, 16, 16).float() / 255 * 2 - 1  # every 8-bit value
    assert torch.equal(quantize(u8, 256).flatten(), torch.arange(256))


# ----------------------------------------------------------------------------- schedule and sampler

def _authors_cosine(t, ns=0.0002, ds=0.00025):
    """cosine_schedule_simple of the authors' diffusion_utils."""
    return math.cos(((t + ns) / (1 + ds)) * math.pi / 2) ** 2


def test_vp_cosine_schedule_matches_the_authors_offsets():
    p = VPCosine()
    for t in (0.0, 1e-3, 0.25, 0.5, 0.9, 1.0):
        assert float(p.gamma(torch.tensor(t, dtype=torch.float64))) == pytest.approx(_authors_cosine(t), rel=1e-12, abs=1e-15)
    g0, g1 = (float(p.gamma(torch.tensor(t, dtype=torch.float64))) for t in (0.0, 1.0))
    assert 1 - 1.0e-7 < g0 < 1 - 0.9e-7        # almost clean at t = 0: 1 − γ ≈ (π/2·2e-4)²
    assert 6.0e-9 < g1 < 6.4e-9                # almost pure noise at t = 1: γ ≈ (π/2·5e-5)²


def _authors_steps(T, td):
    """The authors' generate(): time_step = 1 − i/T, time_step_p = max(1 − (i + 1 + td)/T, 0)."""
    get_step = lambda t: 1.0 - t / T  # noqa: E731
    return [(get_step(float(i)), max(get_step(float(i) + 1 + td), 0.0)) for i in range(T)]


@pytest.mark.parametrize("T", [1, 5, 20])
@pytest.mark.parametrize("td", [0.0, 0.5, 1.0, 2.0])
def test_asymmetric_time_intervals_match_the_authors(T, td):
    flat = lambda pairs: [t for pair in pairs for t in pair]  # noqa: E731
    assert flat(B.asymmetric_times(T, td)) == pytest.approx(flat(_authors_steps(T, td)), abs=1e-15)


@pytest.mark.parametrize("td", [0.0, 1.0, 2.0])
def test_sampler_follows_the_intervals_exactly_on_a_point_mass(td):
    """With the exact x0-predictor of a point mass at c, DDIM (the authors' transition_step: x ←
    √γ_next·x̂0 + √(1 − γ_next)·ε̂, ε̂ = (x − √γ_now·x̂0)/√(1 − γ_now)) scales the input's noise part
    x − √γ·c by √((1 − γ_next)/(1 − γ_now)) at the authors' (t_now, t_next) each step, and returns
    c. With td = 0 the noise ε0 implied by z is kept all the way (closed form)."""
    p, T = VPCosine(), 10
    z = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.full_like(z, 0.7)
    seen = []

    def x0_fn(x, t, sc, y):
        seen.append((t, x.clone()))
        return c

    out = B.generate(x0_fn, z, p, T, td=td, self_cond=False)
    assert torch.allclose(out, c)
    steps = _authors_steps(T, td)
    assert [t for t, _ in seen] == pytest.approx([t_now for t_now, _ in steps])
    assert torch.equal(seen[0][1], z)
    for (_, x), (_, x_next), (t_now, t_next) in zip(seen, seen[1:], steps):
        g_now, g_next = _authors_cosine(t_now), _authors_cosine(t_next)
        want = math.sqrt(g_next) * c + math.sqrt((1 - g_next) / (1 - g_now)) * (x - math.sqrt(g_now) * c)
        assert torch.allclose(x_next, want, atol=1e-9)
    if td == 0:
        eps0 = (z - math.sqrt(_authors_cosine(1.0)) * c) / math.sqrt(1 - _authors_cosine(1.0))
        for (_, x), (_, t_made) in zip(seen[1:], steps):
            g = _authors_cosine(t_made)
            assert torch.allclose(x, math.sqrt(g) * c + math.sqrt(1 - g) * eps0, atol=1e-9)


def test_sampler_feeds_back_the_previous_clipped_estimate():
    seen, outs = [], []

    def x0_fn(x, t, sc, y):
        seen.append(None if sc is None else sc.clone())
        outs.append(1.7 * torch.tanh(3 * x + t))   # exceeds the clip range [−1, 1] in places
        return outs[-1]

    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    B.generate(x0_fn, z, VPCosine(), 6, self_cond=True, clip=1.0)
    assert torch.equal(seen[0], torch.zeros_like(z))
    for i in range(1, 6):
        assert torch.equal(seen[i], outs[i - 1].clamp(-1, 1))
    seen.clear()
    B.generate(x0_fn, z, VPCosine(), 3, self_cond=False)
    assert seen == [None, None, None]


def _authors_ddpm_transition(samples, data_pred, noise_pred, gamma_now, gamma_prev, eps):
    """pix2seq `Scheduler.transition_step`, sampler_name 'ddpm' (ddpm_var_type 'large', the default),
    transcribed to numpy float64: log α_t = log γ_now − log γ_prev, α_t = clip(exp(·), 0, 1),
    x_mean = rsqrt(α_t)·(x − rsqrt(1 − γ_now)·(1 − α_t)·ε̂), var = 1 − α_t, x = x_mean + √var·eps."""
    alpha_t = np.clip(np.exp(np.log(gamma_now) - np.log(gamma_prev)), 0.0, 1.0)
    x_mean = 1 / np.sqrt(alpha_t) * (samples - 1 / np.sqrt(1 - gamma_now) * (1 - alpha_t) * noise_pred)
    return x_mean + np.sqrt(1.0 - alpha_t) * eps


def _authors_generate_ddpm(x0_fn, z, T, td, eps_list, clip=1.0):
    """pix2seq `Scheduler.generate` with pred_type 'x', x0_clip '−1,1', self_cond 'x' (the previous
    step's clipped data_pred, zeros first), sampler 'ddpm'; returns (data_pred, states seen)."""
    get_step = lambda t: 1.0 - t / T  # noqa: E731
    samples, data_pred, seen = z, np.zeros_like(z), []
    for i in range(T):
        g, g_p = _authors_cosine(get_step(float(i))), _authors_cosine(max(get_step(float(i) + 1 + td), 0.0))
        seen.append(samples)
        data_pred = np.clip(x0_fn(samples, get_step(float(i)), data_pred), -clip, clip)
        noise_pred = 1.0 / np.sqrt(1 - g) * (samples - np.sqrt(g) * data_pred)   # get_eps_from_x0
        samples = _authors_ddpm_transition(samples, data_pred, noise_pred, g, g_p, eps_list[i])
    return data_pred, seen


@pytest.mark.parametrize("td", [0.0, 1.0, 2.0])
def test_ddpm_sampler_matches_a_transcription_of_the_authors_step(td):
    """`sampler: ddpm` against pix2seq's generate + transition_step('ddpm'), transcribed in numpy,
    on a toy self-conditioned x0-predictor, with the same fixed noise (one N(0, I) draw a step,
    the last step's too): every state the predictor sees and the returned x̂0 agree."""
    T, shape = 6, (3, 4, 2, 2)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def toy(x, t, sc):   # exceeds the clip range in places; depends on t and on the estimate
        return 1.6 * np.tanh(1.5 * x + 0.3 * sc) + 0.2 * t

    g = torch.Generator().manual_seed(12)
    eps_list = [torch.randn(shape, generator=g, dtype=torch.float64).numpy() for _ in range(T)]
    want, want_seen = _authors_generate_ddpm(toy, z.numpy(), T, td, eps_list)
    seen = []

    def x0_fn(x, t, sc, y):
        seen.append(x.clone())
        return torch.from_numpy(toy(x.numpy(), t, sc.numpy()))

    out = B.generate(x0_fn, z, VPCosine(), T, td=td, self_cond=True, clip=1.0, sampler="ddpm",
                     generator=torch.Generator().manual_seed(12))
    assert np.allclose(out.numpy(), want, atol=1e-10)
    assert len(seen) == T and all(np.allclose(a.numpy(), b, atol=1e-10) for a, b in zip(seen, want_seen))
    # not DDIM: the same predictor through DDIM gives other states
    seen.clear()
    B.generate(x0_fn, z, VPCosine(), T, td=td, self_cond=True, clip=1.0, sampler="ddim")
    assert not np.allclose(seen[1].numpy(), want_seen[1], atol=1e-3)


@pytest.mark.parametrize("td", [0.0, 1.0])
def test_ddpm_step_on_a_point_mass_closed_form(td):
    """Closed form: with the exact x0-predictor of a point mass at c and x = √γ_now·c + √(1 − γ_now)·e,
    one ancestral step (α = γ_now/γ_next) gives x' = √γ_next·c + (α − γ_now)/(√α·√(1 − γ_now))·e
    + √(1 − α)·n. Its noise variance exceeds the marginal's 1 − γ_next by γ_now(1 − α)²/(α(1 − γ_now))
    (the 'large' variance β = 1 − α; the 'small' one, the exact posterior's, would give 0 excess)."""
    p, T, i, c = VPCosine(), 10, 3, 0.6
    t_now, t_next = B.asymmetric_times(T, td)[i]
    g_now, g_next = _authors_cosine(t_now), _authors_cosine(t_next)
    alpha = g_now / g_next
    e = torch.randn(200_000, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    x = math.sqrt(g_now) * c + math.sqrt(1 - g_now) * e
    n = torch.randn(e.shape, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    out = B.ddpm_step(x, torch.full_like(x, c), float(p.gamma(torch.tensor(t_now, dtype=torch.float64))),
                      float(p.gamma(torch.tensor(t_next, dtype=torch.float64))), torch.Generator().manual_seed(14))
    want = math.sqrt(g_next) * c + (alpha - g_now) / (math.sqrt(alpha) * math.sqrt(1 - g_now)) * e + math.sqrt(1 - alpha) * n
    assert torch.allclose(out, want, atol=1e-9)
    excess = float((out - math.sqrt(g_next) * c).var()) - (1 - g_next)
    assert excess == pytest.approx(g_now * (1 - alpha) ** 2 / (alpha * (1 - g_now)), rel=0.05, abs=2e-3)
    assert excess > 0.01


def test_sampler_setting_default_ddim_left_out_of_the_digest_and_used_by_sample():
    """`sampler` defaults to ddim and is left out of the dump (params digests of recipes that do
    not set it are unchanged); `sample` uses the setting: ddpm is stochastic in torch's global
    generator, ddim is not."""
    assert "sampler" not in B.Config().model_dump() and B.Config(sampler="ddpm").model_dump()["sampler"] == "ddpm"
    rec = _Recorder((4, 2, 2))
    z = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(2))

    def model(sampler):
        cfg = B.Config(levels=16, self_cond=True, sampler=sampler)
        return LoadedModel({"method": "bits", "method_config": cfg.model_dump(), "shape": [4, 2, 2], "num_classes": 0},
                           torch.nn.ModuleDict({"net": rec}), VPCosine())

    ddim, ddpm = model("ddim"), model("ddpm")
    assert torch.equal(ddim.sample(z, 4), ddim.sample(z, 4))
    torch.manual_seed(0)
    rec.calls.clear()
    a = ddpm.sample(z, 4)
    xs = [c["x"] for c in rec.calls]
    torch.manual_seed(0)
    rec.calls.clear()
    assert torch.equal(ddpm.sample(z, 4), a)
    rec.calls.clear()
    ddim.sample(z, 4)
    assert not torch.allclose(rec.calls[2]["x"], xs[2])


class _Recorder(torch.nn.Module):
    """A network that records its inputs and returns a fixed function of them."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.calls = shape, []
        self.w = torch.nn.Parameter(torch.tensor(1.3))

    def forward(self, x, t, class_labels=None, cond=None):
        self.calls.append({"x": x.detach().clone(), "cond": None if cond is None else cond.detach().clone(),
                           "grad": torch.is_grad_enabled()})
        return self.w * torch.tanh(2 * x + (0 if cond is None else cond))


def test_sample_feeds_the_network_its_previous_estimate():
    """Through the method's own `sample`: the network's cond input at step i is its clipped output
    of step i − 1 (zeros first); decoded samples are on the 16-level grid."""
    cfg = B.Config(levels=16, self_cond=True)
    rec = _Recorder((4, 2, 2))
    model = LoadedModel({"method": "bits", "method_config": cfg.model_dump(), "shape": [4, 2, 2], "num_classes": 0},
                        torch.nn.ModuleDict({"net": rec}), VPCosine())
    z = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    x = model.sample(z, 4)
    assert x.shape == (5, 1, 2, 2)
    assert torch.allclose(x, dequantize(quantize(x, 16), 16))
    assert torch.equal(rec.calls[0]["cond"], torch.zeros_like(z))
    for i in range(1, 4):
        prev = rec.calls[i - 1]
        assert torch.allclose(rec.calls[i]["cond"], (1.3 * torch.tanh(2 * prev["x"] + prev["cond"])).clamp(-1, 1))
    with pytest.raises(ValueError, match="analog-bit shape"):
        model.sample(torch.randn(2, 2, 2, 2), 2)


# ----------------------------------------------------------------------------- training

def _tiny_data(n=64, side=4):
    x = dequantize(torch.randint(16, (n, 1, side, side), generator=torch.Generator().manual_seed(3)), 16)
    return Dataset(x, None, x[:16], None, 0, None)


def _method(cfg, data=None, inputs=None, net=None):
    net = net or NetworkConfig(arch="mlp", width=32, depth=1, emb_dim=16)
    return B.Method(cfg, Context(data or _tiny_data(), VPCosine(), net, inputs or {}, torch.device("cpu"), 0, 4))


def test_training_self_conditions_the_first_half_without_gradient():
    m = _method(B.Config(self_cond=True, self_cond_rate=0.5))
    rec = _Recorder(m.shape)
    m.nets["net"] = rec
    batch = {k: v[:8] for k, v in m.tensors().items()}
    assert batch["v"].dtype == torch.uint8 and int(batch["v"].max()) <= 15
    m.loss("net", batch, 0)
    first, second = rec.calls
    assert first["x"].shape[0] == 4 and not first["grad"] and torch.equal(first["cond"], torch.zeros_like(first["x"]))
    est = (1.3 * torch.tanh(2 * first["x"])).clamp(-1, 1)
    assert second["grad"] and torch.equal(second["x"][:4], first["x"])
    assert torch.allclose(second["cond"][:4], est) and torch.equal(second["cond"][4:], torch.zeros(4, *m.shape))
    rec.calls.clear()
    m_off = _method(B.Config(self_cond=False))
    m_off.nets["net"] = rec
    m_off.loss("net", batch, 0)
    assert len(rec.calls) == 1 and rec.calls[0]["cond"] is None


def test_loss_is_x0_regression_on_the_encoded_bits():
    """The L2 x0 loss of a fresh network (its output layer is zero, so x̂0 = 0) is the mean of the
    squared analog bits, b_scale², whatever t and the noise."""
    m = _method(B.Config(self_cond=False, b_scale=0.5))
    loss, _ = m.loss("net", {k: v[:16] for k, v in m.tensors().items()}, 0)   # fresh net outputs zeros
    assert loss.item() == pytest.approx(0.25, rel=1e-6)


def test_saved_model_generates_from_bit_shaped_noise_and_init_copies_it():
    data = _tiny_data(side=8)  # digits' shape
    m = _method(B.Config(self_cond=True), data)
    with torch.no_grad():
        for p in m.nets["net"].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    with tempfile.TemporaryDirectory() as d:
        save_model(d, "bits", m.cfg, m.net_cfgs, {"net": m.nets["net"].state_dict()}, data.shape,
                   data.num_classes, m.ctx.noise, m.meta())
        lm = load_model(d)
    assert lm.shape == (4, 8, 8) and lm.meta["data_shape"] == [1, 8, 8]
    z = torch.randn(6, *lm.shape, generator=torch.Generator().manual_seed(4))
    x = lm.sample(z, 5)
    assert x.shape == (6, 1, 8, 8) and torch.allclose(x, dequantize(quantize(x, 16), 16))
    # noise of the data shape: each row's bit noise is a deterministic function of that row alone
    zd = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    nb = B.bit_noise(zd, lm.shape)
    assert nb.shape == (6, 4, 8, 8) and torch.equal(B.bit_noise(zd[3:], lm.shape), nb[3:])
    assert not torch.equal(nb[0], nb[1]) and abs(float(nb.std()) - 1) < 0.1
    assert torch.equal(lm.sample(zd, 3), lm.sample(nb, 3))
    # init: same weights, other sampling settings (td); td = 0 reproduces the model's samples exactly
    same = _method(B.Config(self_cond=True), data, {"init": lm})
    assert all(torch.equal(a, b) for a, b in zip(same.nets["net"].state_dict().values(), lm.nets["net"].state_dict().values()))
    with pytest.raises(ValueError, match="inputs.init"):
        _method(B.Config(self_cond=False), data, {"init": lm})
    with pytest.raises(ValueError, match="inputs.init"):
        _method(B.Config(self_cond=True, code="gray"), data, {"init": lm})


def test_bits_sets_cond_channels_itself():
    with pytest.raises(ValueError, match="cond_channels"):
        _method(B.Config(), net=NetworkConfig(arch="mlp", width=8, depth=1, cond_channels=4))


def test_training_learns_the_value_histogram():
    """A measured effect: 150 steps on data whose values are all 3 or 12 (of 16) bring the
    decoded samples' histogram close to the data's (the untrained network's is not)."""
    torch.manual_seed(0)
    v = torch.where(torch.rand(256, 1, 2, 2) < 0.3, 3, 12)
    x = dequantize(v, 16)
    data = Dataset(x, None, x, None, 0, None)
    m = _method(B.Config(self_cond=True), data, net=NetworkConfig(arch="mlp", width=64, depth=1, emb_dim=32))
    z = torch.randn(256, *m.shape, generator=torch.Generator().manual_seed(5))

    def hist_distance():
        lm = LoadedModel({"method": "bits", "method_config": m.cfg.model_dump(), "shape": list(m.shape), "num_classes": 0},
                         m.nets, VPCosine())
        return M.value_histogram_distance(lm.sample(z, 10), x, 16)

    before = hist_distance()
    from fastgen_core import loop
    loop.train(m, TrainConfig(steps=150, batch_size=64, lr=3e-3, ema_decay=0.0), None, progress=False)
    after = hist_distance()
    assert before > 0.5 and after < 0.1, (before, after)


# ----------------------------------------------------------------------------- metric

def test_value_histogram_distance_closed_form():
    lo, hi = -torch.ones(10, 1, 2, 2), torch.ones(10, 1, 2, 2)
    assert M.value_histogram_distance(lo, lo, 16) == 0
    assert M.value_histogram_distance(lo, hi, 16) == pytest.approx(1.0)
    half = torch.cat([lo[:5], hi[:5]])
    assert M.value_histogram_distance(half, hi, 16) == pytest.approx(0.5)
    # values are compared on the L-level grid: a perturbation below half a level changes nothing
    assert M.value_histogram_distance(half + 0.03, half, 16) == 0
    # three levels vs their shuffled copy: same histogram
    x = dequantize(torch.randint(16, (50, 1, 3, 3)), 16)
    assert M.value_histogram_distance(x, x.flatten()[torch.randperm(x.numel())].reshape(x.shape), 16) == pytest.approx(0)
