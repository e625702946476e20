"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"; docs/methods.md §4). sCD and sCT.

TrigFlow: x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d² I), t ∈ [0, π/2]; an EDM
noise level σ is the time t = arctan(σ/σ_d) (conversions: `noise.to_edm/from_edm("trigflow")`).

    consistency model (the paper's TrigFlow parameterisation):
        f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, c_noise(t))
    ODE velocity dx_t/dt:
        sCT: cos t·z − sin t·x0                                  (one-sample estimate)
        sCD: σ_d·F_teacher = (cos t·x_t − x̂0_teacher(x_t, t))/sin t   (EDM teacher at σ = σ_d·tan t)
    tangent (the paper's training algorithm, with warmup r and normalisation):
        g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d·dF⁻/dt),
        g ← g/(‖g‖/√D + c)  (`tangent_norm: rms`, default, NVlabs/FastGen)   or   g/(‖g‖ + c)  (`l2`, the paper's text)
        cos t·sin t·dF⁻/dt = JVP of (x, t) ↦ F_θ⁻(x/σ_d, c_noise(t)) along (cos t·sin t·dx_t/dt, cos t·sin t)
    loss with the learned adaptive weighting w_φ(t) and the prior weight p(t):
        L(θ, φ) = p(t)·e^{w_φ(t)}/D·‖F_θ(x_t/σ_d, t) − F_θ⁻(x_t/σ_d, t) − g‖² − w_φ(t)
        p(t) = 1/(σ_d·tan t) = 1/σ (`prior_weight: true`, NVlabs/FastGen and diffusers' SANA-Sprint
        script), or 1 (the paper's Algorithm 1)
    with θ⁻ = stopgrad θ (no EMA target), t = arctan(σ/σ_d), ln σ ~ N(−1.0, 1.4²), t clamped to
    [arctan(σ_min/σ_d), arctan(σ_max/σ_d)] (away from 0 and π/2), r = min(1, step/warmup_steps).
    The forward pass and the JVP run under the same dropout mask.

Time label c_noise (a choice, `Config.c_noise`):
    "edm" (default): c_noise(t) = ¼·ln(σ_d·tan t), the EDM label of the matched σ. Then the
        student can start *exactly* from the EDM teacher: with σ = σ_d·tan t one has
        c_in(σ)·(x_t/cos t) = x_t/σ_d, c_skip(σ) = cos²t, c_out(σ) = σ_d·sin t, so the teacher's
        x̂0 = cos t·x_t + σ_d·sin t·F_EDM(x_t/σ_d, ¼ln σ), i.e. F_θ = −F_EDM makes f_θ = x̂0_teacher.
        Initialisation copies the teacher's weights and negates its output layer. The JVP is
        well conditioned because its time tangent is cos t·sin t·dc_noise/dt = ¼.
    "t": c_noise(t) = t (the paper's identity time embedding). The EDM teacher's weights do not
        fit this label, so the student then trains from scratch (init_from_teacher must be off).

Sampling: 1 step x0 = f(x_T, t_max) with x_T = σ_d·sin(t_max)·z (the EDM input
σ_max·z rescaled by cos t_max), t_max = arctan(σ_max/σ_d); 2 steps re-noise x0 at t_mid = 1.1
(**unconfirmed**, docs/methods.md §4) and apply f again; more steps use the Karras grid mapped to t.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import FieldError
from ..nets import FourierFeatures
from ..noise import denoiser_in, from_edm, to_edm
from ..tangents import jvp, normalise, warmup
from .base import Group, Role
from .base import Method as _Base
from .common import (TangentSettings, col, condition, edm_consistency_fn, multistep_sigmas, network_settings,
                     new_seed, per_sample, same_randomness)


class Config(TangentSettings):
    """sCM's settings; the tangent warmup factor r rises to 1 (`warmup_steps`)."""

    name: Literal["scm"] = "scm"
    variant: Literal["scd", "sct"] = Field("scd", description="scd: ODE velocity from an EDM teacher; sct: one-sample estimate, no teacher")
    P_mean: float = Field(-1.0, description="ln σ ~ N(P_mean, P_std²), t = arctan(σ/σ_d)")
    P_std: float = Field(1.4, gt=0, description="see P_mean")
    c_noise: Literal["edm", "t"] = Field("edm", description="time label: ¼·ln(σ_d·tan t) (allows teacher init) or t")
    init_from_teacher: bool = Field(True, description="start from the EDM teacher (F_θ = −F_EDM; needs c_noise: edm)")
    weight_width: int = Field(128, gt=0, description="width of the adaptive weighting MLP w_φ(t)")
    t_mid: float = Field(1.1, gt=0, lt=math.pi / 2, description="2-step sampling: intermediate time (unconfirmed)")
    tangent_norm: Literal["l2", "rms"] = Field("rms", description="tangent normalisation g/(‖g‖/√D + c) (rms, NVlabs/FastGen: c means the same at any D) or g/(‖g‖ + c) (l2, the paper's text); docs/methods.md §4")
    prior_weight: bool = Field(False, description="multiply the loss term by the prior weight 1/(σ_d·tan t) (NVlabs/FastGen, SANA-Sprint; not in the paper's Algorithm 1; worse 1-step samples here, docs/methods.md §4)")

    @model_validator(mode="after")
    def _init_needs_edm_label(self):
        if self.variant == "scd" and self.init_from_teacher and self.c_noise != "edm":  # sCT has no teacher
            raise FieldError("init_from_teacher", "init_from_teacher needs c_noise: edm (the teacher's time "
                             "label); set init_from_teacher: false to train a c_noise: t student from scratch")
        return self


# ----------------------------------------------------------------------------- TrigFlow pieces

def c_noise(t: torch.Tensor, kind: str, sigma_data: float) -> torch.Tensor:
    """Network time label: t, or ¼·ln σ with σ = σ_d·tan t (see module docstring)."""
    return t if kind == "t" else to_edm("trigflow", t, sigma_data)[1].log() / 4


def F_theta(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float, kind: str, **cond) -> torch.Tensor:
    """F_θ(x_t/σ_d, c_noise(t))."""
    return net(x_t / sigma_data, c_noise(t, kind, sigma_data), **cond)


def f_theta(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float, kind: str, **cond) -> torch.Tensor:
    """f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, c_noise(t))."""
    t = per_sample(t, x_t)
    F = F_theta(net, x_t, t, sigma_data, kind, **cond)
    return col(torch.cos(t), x_t) * x_t - col(torch.sin(t), x_t) * sigma_data * F


def t_range(noise) -> tuple[float, float]:
    """[t_min, t_max] = arctan(σ_min/σ_d), arctan(σ_max/σ_d): t kept away from 0 and π/2."""
    t_min, t_max = from_edm("trigflow", torch.tensor([noise.sigma_min, noise.sigma_max], dtype=torch.float64),
                            noise.sigma_data).tolist()
    return t_min, t_max


def sample_t(n: int, P_mean: float, P_std: float, noise, device=None) -> torch.Tensor:
    """t = arctan(σ/σ_d), ln σ ~ N(P_mean, P_std²), clamped to `t_range`."""
    sigma = (P_mean + P_std * torch.randn(n, device=device)).exp()
    t_min, t_max = t_range(noise)
    return from_edm("trigflow", sigma, noise.sigma_data).clamp(t_min, t_max)


def dxt_dt_sct(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sCT velocity estimate dx_t/dt = cos t·z − sin t·x0 (z ~ N(0, σ_d² I), the noise of x_t)."""
    return col(torch.cos(t), x0) * z - col(torch.sin(t), x0) * x0


def dxt_dt_scd(D_trig, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """sCD velocity σ_d·F_teacher = (cos t·x_t − x̂0_teacher(x_t, t))/sin t, where D_trig is the EDM
    teacher wrapped by `noise.denoiser_in("trigflow", ...)` (queried at σ = σ_d·tan t)."""
    x0_hat = D_trig(x_t, t, **cond)
    return (col(torch.cos(t), x_t) * x_t - x0_hat) / col(torch.sin(t), x_t)


def tangent_g(F_minus: torch.Tensor, cs_dF_dt: torch.Tensor, dxt_dt: torch.Tensor, x_t: torch.Tensor,
              t: torch.Tensor, r: float, sigma_data: float) -> torch.Tensor:
    """g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·cos t·sin t·x_t − r·σ_d·(cos t·sin t·dF⁻/dt)."""
    cos, sin = col(torch.cos(t), x_t), col(torch.sin(t), x_t)
    return -cos**2 * (sigma_data * F_minus - dxt_dt) - r * cos * sin * x_t - r * sigma_data * cs_dF_dt


def dF_dt(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor, sigma_data: float,
          kind: str, mode: str = "func", eps: float = 1e-3, seed: int | None = None, **cond):
    """(F⁻, cos t·sin t·dF⁻/dt) along the ODE, from ONE JVP of (x, t) ↦ F_θ(x/σ_d, c_noise(t))
    with tangents (cos t·sin t·dx_t/dt, cos t·sin t) (or a central difference, mode "fd")."""
    cs = torch.cos(t) * torch.sin(t)
    fn = lambda x, tt: F_theta(net, x, tt, sigma_data, kind, **cond)  # noqa: E731
    return jvp(fn, (x_t, t), (col(cs, x_t) * dxt_dt, cs), mode=mode, eps=eps, seed=seed)


def normalise_tangent(g: torch.Tensor, c: float, norm: str = "l2") -> torch.Tensor:
    """g/(‖g‖ + c) ("l2"), or g/(‖g‖/√D + c) = √D·g/(‖g‖ + c·√D) ("rms"), D the dims of one sample."""
    if norm == "l2":
        return normalise(g, c)
    root_D = math.sqrt(g[0].numel())
    return root_D * normalise(g, c * root_D)


def prior_weight(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """p(t) = 1/(σ_d·tan t), i.e. 1/σ at the matched EDM level."""
    return 1 / to_edm("trigflow", t, sigma_data)[1]


class AdaptiveWeight(nn.Module):
    """w_φ(t): a small MLP on fixed Fourier features of t; zero-initialised output (w = 0)."""

    def __init__(self, width: int = 128, seed: int = 3):
        super().__init__()
        self.fourier = FourierFeatures(width, seed=seed)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.fourier(t.reshape(-1))).reshape(-1)


def negate_output(net: nn.Module) -> None:
    """F_θ = −F_EDM: negate the (linear or conv) output layer `net.out` in place."""
    with torch.no_grad():
        net.out.weight.neg_()
        if net.out.bias is not None:
            net.out.bias.neg_()


# ----------------------------------------------------------------------------- method

class Method(_Base):
    roles = {"teacher": Role("model", required=False, method="edm",
                             description="the EDM teacher: sCD's ODE velocity and the initial weights (needed by sCD)")}

    @classmethod
    def required_roles(cls, cfg: Config) -> set[str]:
        return {"teacher"} if cfg.variant == "scd" else set()

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs.get("teacher")
        net_cfg = network_settings(ctx, teacher)
        init = cfg.init_from_teacher and teacher is not None
        if init and cfg.c_noise != "edm":
            raise ValueError("init_from_teacher needs c_noise: edm (the teacher's time label); "
                             "set init_from_teacher: false to train a c_noise: t student from scratch")
        self.add_net("net", net_cfg, init_from=teacher.nets["net"] if init else None)
        if init:
            negate_output(self.nets["net"])
        self.nets["weight"] = AdaptiveWeight(cfg.weight_width).to(ctx.device)
        self.sd = ctx.noise.sigma_data
        self.D_trig = denoiser_in("trigflow", teacher.denoiser(), self.sd) if teacher is not None else None

    def groups(self):
        return [Group("net", list(self.nets["net"].parameters()) + list(self.nets["weight"].parameters()))]

    def loss(self, group, batch, step):
        cfg, sd, net = self.cfg, self.sd, self.nets["net"]
        x0, y = batch["x"], self.labels(batch)
        cond = condition(y)
        t = sample_t(x0.shape[0], cfg.P_mean, cfg.P_std, self.ctx.noise, x0.device)
        z = sd * torch.randn_like(x0)
        x_t = col(torch.cos(t), x0) * x0 + col(torch.sin(t), x0) * z
        if cfg.variant == "sct":
            v = dxt_dt_sct(x0, z, t)
        else:
            with torch.no_grad():
                v = dxt_dt_scd(self.D_trig, x_t, t, **cond)
        r = warmup(step, cfg.warmup_steps)
        seed = new_seed()
        with same_randomness(seed, x0):
            F = F_theta(net, x_t, t, sd, cfg.c_noise, **cond)
        F_minus, cs_dF = dF_dt(net, x_t, t, v, sd, cfg.c_noise, cfg.jvp, cfg.fd_eps, seed, **cond)
        g = normalise_tangent(tangent_g(F_minus, cs_dF, v, x_t, t, r, sd), cfg.tangent_c, cfg.tangent_norm)
        w = self.nets["weight"](t).float()
        D = x0[0].numel()
        sq = (F.float() - F_minus.float() - g.float()).pow(2).flatten(1).sum(1)
        p = prior_weight(t.float(), sd) if cfg.prior_weight else 1.0
        loss = (p * torch.exp(w) / D * sq - w).mean()
        return loss, {"r": r, "w": w.mean().detach(), "sq": (sq / D).mean().detach()}


# ----------------------------------------------------------------------------- sampling

def trig_times(noise, nfe: int, t_mid: float = 1.1) -> list[float]:
    """Sampling times: [t_max] (1 step), [t_max, t_mid] (2 steps), else the Karras grid of
    nfe + 1 levels without its last, mapped to t = arctan(σ/σ_d)."""
    t_max = t_range(noise)[1]
    if nfe == 1:
        return [t_max]
    if nfe == 2:
        return [t_max, t_mid]
    return from_edm("trigflow", multistep_sigmas(noise, nfe).double(), noise.sigma_data).tolist()


@torch.no_grad()
def trig_multistep(net, z: torch.Tensor, times: list[float], sigma_data: float, kind: str, **cond) -> torch.Tensor:
    """x = σ_d·sin(t_0)·z; x0 = f(x, t_0); for n ≥ 1: x = cos t_n·x0 + sin t_n·σ_d·z_n; x0 = f(x, t_n)."""
    x = sigma_data * math.sin(times[0]) * z
    x0 = f_theta(net, x, torch.tensor(times[0]), sigma_data, kind, **cond)
    for t in times[1:]:
        x = math.cos(t) * x0 + math.sin(t) * sigma_data * torch.randn_like(x0)
        x0 = f_theta(net, x, torch.tensor(t), sigma_data, kind, **cond)
    return x0


def consistency_fn(model):
    """f(x, σ) in the EDM convention (x = x0 + σ·n): f_θ(cos t·x, t) at t = arctan(σ/σ_d)."""
    cfg, sd, net = model.cfg, model.noise.sigma_data, model.nets["net"]
    return edm_consistency_fn(lambda x_t, t, **cond: f_theta(net, x_t, t, sd, cfg.c_noise, **cond), "trigflow", sd)


def sample(model, z, nfe, class_labels=None):
    cfg = model.cfg
    cond = condition(class_labels)
    times = trig_times(model.noise, nfe, cfg.t_mid)
    return trig_multistep(model.nets["net"], z, times, model.noise.sigma_data, cfg.c_noise, **cond)
