"""LowDiff: one network for a cascade of resolutions (docs/methods.md §11).

LowDiff has no public code and only its abstract is confirmed: one model serves every resolution,
generating a small image first and each larger one conditioned on the smaller, with few steps at
the expensive full resolution. Everything below is OUR design [ours], documented in §11.

Pyramid. Resolutions r_0 < r_1 < … < r_K = H (sides; e.g. 2, 4, 8 for 8×8 digits), each dividing
the next. An r-resolution image is held at full size, upsampled by nearest neighbour: with the
block side f = H/r,

    down_f(x) = f×f average pooling,   up_f(x) = nearest upsampling,   P_f = up_f ∘ down_f,

so down_f(up_f(x)) = x exactly and P_f is the orthogonal projection onto images constant on f×f
blocks. Vectors (N, D) are pooled over runs of f consecutive entries the same way. By default the
pyramid is H/4, H/2, H (fewer where H or H/2 is odd). Holding every level at full size lets one network
of fixed shape (an MLP, or a U-Net at H×H) serve all levels, at the price that a
low-resolution evaluation costs as much as a full-resolution one here (a convolutional net at
native sizes would make it ~(r/H)² as cheap).

Model. One EDM-preconditioned network with the resolution as its scalar condition and the
upsampled lower-resolution image as extra input channels:

    D_k(x, σ; c) = P_{f_k}( D_θ(x, σ, w = log₂ r_k, cond = c) ),   D_θ = c_skip·x + c_out·F_θ(c_in·x, c_noise, …)

(`NetworkConfig.scalar_cond`, `cond_channels` = C, set by this method). The projection keeps a
level's output, and so its whole sampling path, on its own resolution (it is the identity at r_K).

Training, jointly on all levels: per sample a level k ~ U{0..K}, its data x0^(k) = P_{f_k} x0, its
condition c^(k) = P_{f_{k−1}} x0 (zeros at k = 0) and its noise ε^(k) = f_k·P_{f_k} ε (standard
normal per low-resolution pixel); EDM's loss at that level,

    L = λ(σ)·‖D_k(x0^(k) + σ·ε^(k), σ; c^(k)) − x0^(k)‖²,   ln σ ~ N(P_mean, P_std²).

Sampling (`cascade_sample`): level 0 from x = σ_max·ε^(0) with c = 0; level k ≥ 1 from
x = c + σ_start·ε^(k), c = the finished level k − 1 (already upsampled), σ_start = `refine_sigma_max`
(default σ_max; the added c is then negligible). Each level solves the PF-ODE with the teacher's
rule for an NFE budget (`samplers.teacher_sample`: Euler for 1–2 NFE, else Heun with (nfe + 1)//2
steps on the Karras grid from σ_start). The full-resolution level uses the caller's z; lower levels
draw fresh low-resolution noise from torch's global generator. `sample(model, z, nfe)` spends `nfe`
at full resolution and `low_nfe` (a model setting; default 35 at r_0, 17 above) below it. On 8×8
digits one full-resolution Euler step from c + 5·z after 35 + 17 low-resolution NFE matches the
teacher's FD at 17 NFE (docs/methods.md §11, measured). With `cascade=False` only the
full-resolution level runs, with c = 0: exactly the plain EDM Heun sampler of the same network at
w = log₂ H, cond = 0.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import FieldError, Strict
from ..noise import EDMDenoiser
from ..samplers import teacher_nfe, teacher_sample
from .base import Method as _Base
from .common import col, condition


class Config(Strict):
    name: Literal["lowdiff"] = "lowdiff"
    resolutions: list[int] | None = Field(
        None, min_length=1, description="the cascade's sides r_0 < … < r_K, ascending, each dividing the next; "
        "the last is the image side H (vectors: the length D); None: H/4, H/2, H (as many halvings as divide H, "
        "at most two)")
    low_nfe: list[int] | None = Field(
        None, description="NFE spent at each level below full resolution (one per level r_0 … r_{K−1}; 1, 2 or "
        "odd, spent as Heun with (nfe + 1)//2 steps); None: 35 at r_0, 17 at the others; the full-resolution "
        "NFE is the sampler's nfe")
    refine_sigma_max: float | None = Field(
        None, gt=0, description="σ at which levels k ≥ 1 start from c + σ·ε (None: the noise process's σ_max)")

    @model_validator(mode="after")
    def _pyramid(self):
        r = self.resolutions
        if r is None:
            if self.low_nfe is not None:
                raise FieldError("low_nfe", "give resolutions with low_nfe (one NFE per level below full resolution)")
            return self
        if any(a <= 0 for a in r):
            raise FieldError("resolutions", f"every resolution must be > 0, got {r}")
        if any(b <= a or b % a for a, b in zip(r, r[1:])):
            raise FieldError("resolutions", f"resolutions must ascend, each dividing the next, got {r}")
        if self.low_nfe is None:
            return self
        if len(self.low_nfe) != len(r) - 1:
            raise FieldError("low_nfe", f"one NFE per level below full resolution: {len(r) - 1} for "
                             f"resolutions {r}, got {len(self.low_nfe)}")
        bad = [n for n in self.low_nfe if n <= 0 or teacher_nfe(n) != n]
        if bad:
            raise FieldError("low_nfe", f"each NFE must be 1, 2 or odd (Heun spends 2·steps − 1), got {bad}")
        return self


# ----------------------------------------------------------------------------- pyramid

def down(x: torch.Tensor, f: int) -> torch.Tensor:
    """f×f average pooling of images (N, C, H, W) -> (N, C, H/f, W/f); of vectors (N, D), the mean of
    each run of f consecutive entries -> (N, D/f)."""
    if f == 1:
        return x
    if x.ndim == 2:
        return x.reshape(x.shape[0], -1, f).mean(-1)
    return torch.nn.functional.avg_pool2d(x, f)


def up(x: torch.Tensor, f: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by f: each pixel becomes an f×f block (vectors: f copies)."""
    if f == 1:
        return x
    if x.ndim == 2:
        return x.repeat_interleave(f, dim=-1)
    return x.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def project(x: torch.Tensor, f: int) -> torch.Tensor:
    """P_f = up_f ∘ down_f: x at resolution side/f, held at full size."""
    return up(down(x, f), f)


def side_of(shape) -> int:
    """The side the resolutions count: H of (C, H, W), D of a vector (D,)."""
    return int(shape[1] if len(shape) == 3 else shape[0])


def pyramid(cfg: Config, shape) -> tuple[list[int], list[int]]:
    """(resolutions, low_nfe) of a model for samples of `shape`, defaults filled in."""
    side = side_of(shape)
    res = cfg.resolutions
    if res is None:
        res = [side]
        while len(res) < 3 and res[0] % 2 == 0:
            res.insert(0, res[0] // 2)
    low = cfg.low_nfe if cfg.low_nfe is not None else [35] + [17] * (len(res) - 2) if len(res) > 1 else []
    return list(res), list(low)


def factors(resolutions: list[int], side: int) -> list[int]:
    """Block sides f_k = H/r_k of the levels."""
    return [side // r for r in resolutions]


def level_label(r: int) -> float:
    """The resolution embedding's input w = log₂ r."""
    return math.log2(r)


# ----------------------------------------------------------------------------- model

def level_denoiser(D, r: int, f: int, c: torch.Tensor | None):
    """D_k(x, σ, **cond) = P_f(D(x, σ, w = log₂ r, cond = c, **cond)): level r of the cascade, its
    condition c the upsampled lower level (None: zeros)."""
    w = level_label(r)

    def Dk(x, sigma, **cond):
        return project(D(x, sigma, w=torch.full((x.shape[0],), w, device=x.device), cond=c, **cond), f)
    return Dk


@torch.no_grad()
def cascade_sample(D, z: torch.Tensor, noise, resolutions: list[int], nfes: list[int],
                   refine_sigma_max: float | None = None, **cond) -> torch.Tensor:
    """The cascade: level k solves the PF-ODE of D_k from c + σ_start·ε^(k) (`teacher_sample` with
    nfes[k]), c the finished level k − 1 (zeros at level 0). z is the full-resolution noise; lower
    levels draw theirs from torch's global generator at their native size."""
    side = side_of(z.shape[1:])
    c = None
    for k, (r, f, nfe) in enumerate(zip(resolutions, factors(resolutions, side), nfes)):
        eps = z if f == 1 else up(torch.randn(down(z, f).shape, device=z.device, dtype=z.dtype), f)
        proc = noise
        if k > 0 and refine_sigma_max is not None:
            proc = noise.model_copy(update={"sigma_max": refine_sigma_max})
        start = eps if c is None else eps + c / proc.sigma_max  # teacher_sample starts at σ_start·(its z)
        c = teacher_sample(level_denoiser(D, r, f, c), start, proc, nfe, **cond)
    return c


class Method(_Base):
    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        data = ctx.data
        if ctx.network is None:
            raise ValueError("method lowdiff needs the stage's network settings")
        if ctx.network.cond_channels or ctx.network.scalar_cond:
            raise ValueError("network.cond_channels / scalar_cond: method lowdiff sets them (the lower level, the "
                             "resolution); remove them")
        if len(data.shape) not in (1, 3):
            raise ValueError(f"method lowdiff needs images (C, H, W) or vectors (D,), got shape {data.shape}")
        side, self.resolutions = side_of(data.shape), pyramid(cfg, data.shape)[0]
        self.f = factors(self.resolutions, side)
        self.w_levels = torch.tensor([level_label(r) for r in self.resolutions], device=ctx.device)
        if self.resolutions[-1] != side or any(data.shape[-1] % f for f in self.f):
            raise ValueError(f"method.resolutions: the last must be the sample's side {side} and every block side "
                             f"must divide the width {data.shape[-1]}, got {self.resolutions}")
        # the lower level enters as C extra channels (vectors: D extra features)
        self.add_net("net", ctx.network.model_copy(update={"scalar_cond": True, "cond_channels": data.shape[0]}))
        self.D = EDMDenoiser(self.nets["net"], ctx.noise)

    def level_batch(self, x0: torch.Tensor, k: torch.Tensor):
        """Per sample at level k[i]: (x0^(k), c^(k), ε^(k), w = log₂ r_k)."""
        f = self.f
        eps = torch.randn_like(x0)
        pick = lambda vals: torch.stack(vals)[k, torch.arange(len(k), device=k.device)]  # noqa: E731  (level k[i] of sample i)
        proj = [project(x0, fk) for fk in f]  # x0 at every level, once
        x_k = pick(proj)
        c_k = pick([torch.zeros_like(x0)] + proj[:-1])
        e_k = pick([fk * project(eps, fk) for fk in f])
        w = self.w_levels[k]
        return x_k, c_k, e_k, w

    def loss(self, group, batch, step):
        x0, y = batch["x"], self.labels(batch)
        k = torch.randint(len(self.f), (x0.shape[0],), device=x0.device)
        x_k, c_k, e_k, w = self.level_batch(x0, k)
        sigma = self.ctx.noise.sample_sigma(x0.shape[0], device=x0.device)
        cond = condition(y)
        out = self.D(x_k + col(sigma, x0) * e_k, sigma, w=w, cond=c_k, **cond)
        # P_{f_k} per sample: the level's projection of the output
        Dk = torch.stack([project(out, fk) for fk in self.f])[k, torch.arange(len(k), device=k.device)]
        per = ((Dk - x_k) ** 2).flatten(1).mean(1)
        return (self.ctx.noise.loss_weight(sigma) * per).mean(), {}

    def meta(self):
        return {"resolutions": self.resolutions}


def sample(model, z, nfe, class_labels=None, *, low_nfe: list[int] | None = None,
           refine_sigma_max: float | None = None, cascade: bool = True):
    """`nfe` evaluations at full resolution after the lower levels' `low_nfe`; `low_nfe` and
    `refine_sigma_max` default to the model's settings (bench/lowdiff.py sweeps them);
    `cascade=False`: the full-resolution level alone with c = 0 (the plain EDM sampler)."""
    cfg = model.cfg
    refine = cfg.refine_sigma_max if refine_sigma_max is None else refine_sigma_max
    res, low = pyramid(cfg, model.shape)
    nfes = list(low if low_nfe is None else low_nfe) + [nfe]
    if not cascade:
        res, nfes = res[-1:], [nfe]
    cond = condition(class_labels)
    return cascade_sample(model.denoiser(), z, model.noise, res, nfes, refine, **cond)
