"""Analog Bits: discrete data through bits, self-conditioning, asymmetric time intervals
(Chen, Zhang & Hinton 2023; docs/methods.md §7; the authors' code is google-research/pix2seq).

Data. Images in [−1, 1] are quantised to L levels and each value is written as n = ⌈log₂ L⌉ analog
bits ±b_scale (`fastgen_core.bits`): digits at L = 16 become (4, 8, 8), 8-bit RGB images (24, H, W).
Quantising happens in `tensors()` (the loop draws integer values; `loss` encodes each minibatch).

Noise (process `vp_cosine`, docs/methods.md §0): x_t = √γ(t)·x0 + √(1 − γ(t))·ε, t ~ U[0, 1],
γ(t) = cos²(((t + 2e-4)/(1 + 2.5e-4))·π/2).

Model: x0-prediction, x̂0 = F_θ(x_t, c_noise(t), cond = self-conditioning input), L2 loss
‖x̂0 − x0‖² averaged over bits. [ours] The network's time label is EDM's c_noise = ¼·ln σ(t),
σ = √((1 − γ)/γ) (the authors feed γ to their own embedding).

Self-conditioning (rate r = 0.5): on the first ⌊r·N⌋ rows of a (randomly drawn) minibatch the
network first predicts x̃0 = clip(F_θ([x_t, 0], t)) without gradient; the training pass then sees
[x_t, stopgrad x̃0]; the other rows see [x_t, 0]. At sampling each step is fed the previous step's
clipped x̂0 (zeros at the first step).

Sampler (`sampler`): DDIM (default) or DDPM (ancestral; the authors' config default and their
CIFAR-10 evaluations), both on the asymmetric time intervals (T = nfe steps, one network
evaluation each), as the authors' Scheduler.generate / transition_step:
    t_now = 1 − i/T,   t_next = max(1 − (i + 1 + td)/T, 0),   i = 0 … T − 1,
    x̂0 = clip(F_θ(x, t_now, x̂0_prev)),  ε̂ = (x − √γ_now·x̂0)/√(1 − γ_now),
    ddim: x ← √γ_next·x̂0 + √(1 − γ_next)·ε̂;
    ddpm: α = clip(γ_now/γ_next, 0, 1), x ← (x − (1 − α)/√(1 − γ_now)·ε̂)/√α + √(1 − α)·n, n ~ N(0, I)
          (the authors' 'large' variance β = 1 − α; td enters only through γ_next);
the last x̂0 is decoded by thresholding at 0 and mapped back to the data range. DDPM draws its
noise from torch's global generator (the evaluate stage seeds it per sampling seed).

Noise shape. A bits model generates from standard-normal noise of the analog-bit shape (C·n, H, W);
model.json's `shape` is that shape (so `LoadedModel.shape`, and the evaluate stage's noise, are the
generator's), and `data_shape` the decoded one. `sample` returns decoded values of `data_shape`.
[ours] Given noise of the data shape instead (a caller that draws z like the data, e.g. the method
contract), each row's analog-bit noise is drawn from a generator seeded by a digest of that row's
bytes (`bit_noise`): deterministic in z, row by row, and standard normal.

Input `init` (optional): a trained bits model whose weights the network starts from. With
`train.steps: 0` this is the same model with other sampling settings (e.g. another `td` or `sampler`).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Literal

import torch
from pydantic import Field

from ..bits import BitCoder, dequantize, quantize
from ..config import Strict
from ..nets import build_network
from .base import Method as _Base
from .base import Role
from .common import col, condition, per_sample


class Config(Strict):
    name: Literal["bits"] = "bits"
    levels: int = Field(16, ge=2, le=65536, description="quantisation levels L of the data in [−1, 1] "
                        "(n = ⌈log₂ L⌉ bits a value: 16 → 4, 256 → 8)")
    code: Literal["binary", "gray", "perm"] = Field(
        "binary", description="bit code: plain binary, Gray code, or a fixed random permutation of the codewords")
    perm_seed: int = Field(42, ge=0, lt=2**32, description="seed of the permutation (code perm; 42 with "
                           "256 levels is the authors' table)")
    b_scale: float = Field(1.0, gt=0, description="analog bits are ±b_scale")
    self_cond: bool = Field(True, description="self-conditioning: the network also sees an earlier x̂0 estimate")
    self_cond_rate: float = Field(0.5, ge=0, le=1, description="share of each minibatch trained with the "
                                  "self-conditioning estimate (the rest sees zeros)")
    td: float = Field(0.0, ge=0, description="asymmetric time intervals at sampling: t_next = max(1 − (i + 1 + td)/T, 0) "
                      "(td in units of one step 1/T, as the authors' generate())")
    x0_clip: bool = Field(True, description="clip x̂0 to [−b_scale, b_scale] at sampling and in the "
                          "self-conditioning estimate")
    sampler: Literal["ddim", "ddpm"] = Field(
        "ddim", description="ddim (deterministic) or ddpm (ancestral, the authors' 'large' variance β = 1 − γ_now/γ_next; "
        "their config default), both on the asymmetric intervals")
    omit_at_default = {"sampler": "ddim"}  # (Strict) digests of recipes that leave it unset are unchanged


def coder(cfg: Config) -> BitCoder:
    return BitCoder(cfg.levels, cfg.code, cfg.perm_seed, cfg.b_scale)


# ----------------------------------------------------------------------------- the paper's pieces

def asymmetric_times(T: int, td: float = 0.0) -> list[tuple[float, float]]:
    """[(t_now, t_next)] of the T sampling steps: t_now = 1 − i/T, t_next = max(1 − (i + 1 + td)/T, 0)."""
    return [(1 - i / T, max(1 - (i + 1 + td) / T, 0.0)) for i in range(T)]


def x0_hat(net: torch.nn.Module, noise, x_t: torch.Tensor, t, sc: torch.Tensor | None = None,
           class_labels=None) -> torch.Tensor:
    """The network's x0-prediction F_θ(x_t, ¼·ln σ(t), cond = sc) (unclipped)."""
    t = per_sample(t, x_t).double()  # γ(t) near 1 needs float64
    sigma = noise.to_edm(t)[1]
    cond = condition(class_labels)
    if sc is not None:
        cond["cond"] = sc
    return net(x_t, (sigma.log() / 4).float(), **cond)


def ddim_step(x, x0, g_now: float, g_next: float, generator=None) -> torch.Tensor:
    """DDIM (the authors' transition_step 'ddim'): x ← √γ_next·x̂0 + √(1 − γ_next)·ε̂,
    ε̂ = (x − √γ_now·x̂0)/√(1 − γ_now)."""
    eps = (x - g_now**0.5 * x0) / (1 - g_now) ** 0.5
    return g_next**0.5 * x0 + (1 - g_next) ** 0.5 * eps


def ddpm_step(x, x0, g_now: float, g_next: float, generator=None) -> torch.Tensor:
    """Ancestral DDPM (the authors' transition_step 'ddpm', variance 'large'): α = clip(γ_now/γ_next,
    0, 1), x ← (x − (1 − α)/√(1 − γ_now)·ε̂)/√α + √(1 − α)·n, n ~ N(0, I) from `generator`
    (torch's global generator when None)."""
    alpha = min(max(g_now / g_next, 0.0), 1.0)
    eps = (x - g_now**0.5 * x0) / (1 - g_now) ** 0.5
    mean = (x - (1 - alpha) / (1 - g_now) ** 0.5 * eps) / alpha**0.5
    n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return mean + (1 - alpha) ** 0.5 * n


STEPS = {"ddim": ddim_step, "ddpm": ddpm_step}


@torch.no_grad()
def generate(x0_fn: Callable, z: torch.Tensor, noise, steps: int, td: float = 0.0, self_cond: bool = True,
             clip: float | None = 1.0, class_labels=None, sampler: str = "ddim", generator=None) -> torch.Tensor:
    """DDIM or DDPM (`sampler`) from x = z on the asymmetric intervals; returns the last x̂0 (analog bits).

    x0_fn(x, t, sc, class_labels) is the x0-predictor; with `self_cond` it gets the previous
    step's (clipped) x̂0 as sc (zeros at the first step), else sc = None. DDPM draws one noise
    tensor of z's shape a step (the last step's too, as the authors' loop), from `generator`."""
    step = STEPS[sampler]
    x, prev = z, torch.zeros_like(z)
    for t_now, t_next in asymmetric_times(steps, td):
        g_now, g_next = (float(noise.gamma(torch.tensor(t, dtype=torch.float64))) for t in (t_now, t_next))
        x0 = x0_fn(x, t_now, prev if self_cond else None, class_labels)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        x = step(x, x0, g_now, g_next, generator)
        prev = x0
    return prev


# ----------------------------------------------------------------------------- method

class Method(_Base):
    roles = {"init": Role("model", required=False, method="bits",
                          description="a trained bits model to start from (train.steps: 0 keeps it and "
                          "changes only the sampling settings, e.g. td)")}
    processes = ("vp_cosine",)

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        data = ctx.data
        if ctx.network is None:
            raise ValueError("method bits needs the stage's network settings")
        if ctx.network.cond_channels:
            raise ValueError("network.cond_channels: method bits sets it (self-conditioning); remove it")
        self.coder = coder(cfg)
        self.shape = self.coder.shape(data.shape)
        net_cfg = ctx.network.model_copy(update={"cond_channels": self.shape[0] if cfg.self_cond else 0})
        net = build_network(net_cfg, self.shape, data.num_classes).to(ctx.device)
        init = ctx.inputs.get("init")
        if init is not None:
            same = {k: getattr(init.cfg, k) for k in ("levels", "code", "perm_seed", "b_scale", "self_cond")}
            mine = {k: getattr(cfg, k) for k in same}
            if same != mine or init.meta_net_cfg("net") != net_cfg or tuple(init.shape) != self.shape:
                raise ValueError(f"inputs.init: its bits and network settings ({same}, {init.meta_net_cfg('net')}) "
                                 f"differ from this stage's ({mine}, {net_cfg})")
            net.load_state_dict(init.nets["net"].state_dict())
        self.nets["net"], self.net_cfgs["net"] = net, net_cfg

    def tensors(self):
        d = super().tensors()
        v = quantize(d.pop("x"), self.cfg.levels)
        d["v"] = v.to(torch.uint8 if self.cfg.levels <= 256 else torch.int32)
        return d

    def loss(self, group, batch, step):
        x0 = self.coder.encode(batch["v"])
        y, noise, net = self.labels(batch), self.ctx.noise, self.nets["net"]
        t = noise.sample_t(x0.shape[0], device=x0.device)
        x_t = noise.forward(x0, t, torch.randn_like(x0))
        sc = None
        if self.cfg.self_cond:
            sc = torch.zeros_like(x_t)
            k = int(x0.shape[0] * self.cfg.self_cond_rate)
            if k:
                with torch.no_grad():
                    est = x0_hat(net, noise, x_t[:k], t[:k], torch.zeros_like(x_t[:k]), None if y is None else y[:k])
                sc[:k] = est.clamp(-self.cfg.b_scale, self.cfg.b_scale) if self.cfg.x0_clip else est
        pred = x0_hat(net, noise, x_t, t, sc, y)
        return ((pred - x0) ** 2).mean(), {}

    def meta(self):
        # model.json's `shape` is the generator's (analog-bit) shape, which its network is built for
        return {"shape": list(self.shape), "data_shape": list(self.ctx.data.shape)}


def bit_noise(z: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal noise of `shape` per row of z, drawn from a generator seeded by the first 8
    bytes of the SHA-256 of the row's float32 bytes: a deterministic function of each row."""
    rows = z.detach().float().cpu().flatten(1).numpy()
    seeds = [int.from_bytes(hashlib.sha256(r.tobytes()).digest()[:8], "little") for r in rows]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(z.device)


def sample(model, z, nfe, class_labels=None):
    """Decoded samples (N, *data_shape) on the L-level grid in [−1, 1] with `nfe` DDIM or DDPM steps
    (`sampler`, one network evaluation each), from noise z of the analog-bit shape `model.shape`, or of the data
    shape (then `bit_noise(z)`)."""
    cfg = model.cfg
    data_shape = tuple(model.meta.get("data_shape", ()))
    if tuple(z.shape[1:]) == data_shape and data_shape != tuple(model.shape):
        z = bit_noise(z, tuple(model.shape))
    if tuple(z.shape[1:]) != tuple(model.shape):
        raise ValueError(f"a bits model generates from noise of its analog-bit shape {tuple(model.shape)} "
                         f"(or of its data shape {data_shape}), got {tuple(z.shape[1:])}")
    net = model.nets["net"]

    def x0_fn(x, t, sc, y):
        return x0_hat(net, model.noise, x, t, sc, y)

    a = generate(x0_fn, z, model.noise, nfe, cfg.td, cfg.self_cond, cfg.b_scale if cfg.x0_clip else None,
                 class_labels, cfg.sampler)
    return dequantize(coder(cfg).decode(a), cfg.levels).to(z.device)
