"""Align Your Flow: continuous-time flow-map distillation (Sabour, Fidler & Kreis 2025;
docs/methods.md §3). Flow-matching convention: x_t = (1 − t)·x0 + t·ε, t = 1 noise, velocity
v = dx_t/dt = ε − x0; an EDM teacher is used through `noise.denoiser_in("fm", ·)` with
v_teacher(x_t, t) = (x_t − x̂0(x_t, t))/t.

Flow map (jumps from time t to time s ≤ t):
    f_θ(x_t, t, s) = x_t + (s − t)·F_θ(x_t, t, s)              ⇒ f_θ(x, t, t) = x exactly;
s = 0 is a consistency model, s → t gives F_θ → v (flow matching).

Parameterisation of F_θ (our choice, documented): F_θ(x_t, t, s) = (x_t − D_θ(x_t, t; s))/t with
D_θ the EDM-preconditioned network at the matched noise level σ = t/(1 − t) (input x_t/(1 − t);
`noise.denoiser_in("fm", ·)`) and a second time embedding of s (label ¼·ln max(σ(s), σ_min)).
Then f_θ = (s/t)·x_t + (1 − s/t)·D_θ (the CTM form in FM time), and starting from the teacher's
weights with a zero-initialised s-embedding gives F_θ = v_teacher exactly at initialisation.

AYF-EMD (Eulerian): the flow map is constant along the ODE, d/dt f(x_t, t, s) = 0, i.e.
    df/dt = v − F + (s − t)·dF/dt.   One JVP of F_θ⁻ with tangents (v_teacher, 1, 0) on (x_t, t, s)
gives dF⁻/dt; the tangent with warmup r and normalisation is
    g = (v − F⁻) + r·(s − t)·dF⁻/dt,   g ← g/(‖g‖ + 0.1),   L = E ‖F_θ − F⁻ − g‖²/D,
θ⁻ = stopgrad θ; r ramps linearly 0 → r_max = 0.99 over warmup_steps (never 1).
AYF-LMD (Lagrangian): ∂_s f(x_t, t, s) = v(f(x_t, t, s), s). One JVP with tangents (0, 0, 1) gives
∂_s F⁻; with f⁻ = f_θ⁻(x_t, t, s):
    g = (v_teacher(f⁻, s) − F⁻) − r·(s − t)·∂_s F⁻,   normalised, same loss.
At s = t both reduce to flow matching on the teacher velocity.

Autoguided teacher (optional `guide` input, a weaker EDM model): v = λ·v_main + (1 − λ)·v_weak,
i.e. the teacher denoiser is `samplers.autoguided(D_main, D_weak, λ)` (v is affine in x̂0).

Adversarial finetune (optional, `gan: true`; `fastgen_core/gan.py`): a short stage that starts
from a trained AYF student (input role `student`) and adds a GAN term on few-step flow-map samples:
    L = L_AYF + λ_adv·L_G(x̂),   x̂ = k-step flow-map sample from noise, k ~ U{1..gan_steps},
the first k − 1 jumps without gradients, the last one f_θ(x, t_{k−1}, 0) with them; a
discriminator network "disc" (own optimiser group, not exported) learns real data x0 against
detached x̂, optionally both noised (`adversarial.noised`). λ_adv = weight, times the adaptive
weight against L_AYF when on. The paper's finetune is short (~3k steps at scale); its loss,
penalties and sample schedule are (unconfirmed) here (a third-party reimplementation names a
relativistic loss with R1/R2 penalties; we offer the relativistic loss, no penalties).

Unconfirmed choices (docs/methods.md §3): (t, s) are drawn as t ~ U[t_min, t_max], s = u·t (EMD) or
s ∈ [t_min, t] (LMD, the teacher is not defined at s = 0), u ~ U[0, 1], with uniform weighting;
optionally a share `diagonal` of the batch has s = t, where both objectives are flow matching on
the teacher velocity (as flow-map matching's diagonal term; it sharpens F(x, t, t), which many
short jumps compound);
t_min, t_max are σ_min, σ_max mapped to FM time. Sampling starts at t_max from
x = (1 − t_max)·σ_max·z (the EDM input σ_max·z in FM scaling) and jumps x ← f_θ(x, t_i, t_{i+1})
over the Karras grid of nfe + 1 levels (without its last) mapped to FM time, then to s = 0.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..gan import GANConfig, add_discriminator, gan_groups, gan_term
from ..noise import EDMDenoiser, denoiser_in, from_edm, to_edm
from ..samplers import autoguided
from ..tangents import jvp, normalise, warmup
from .base import Method as _Base
from .base import Role
from .common import (TangentSettings, add_trained_student, add_two_time_student, col, condition,
                     edm_consistency_fn, multistep_sigmas, new_seed, per_sample, same_randomness)


class Config(TangentSettings):
    """AYF's settings; the tangent warmup factor r rises to `r_max` (`warmup_steps`)."""

    name: Literal["ayf"] = "ayf"
    objective: Literal["emd", "lmd"] = Field("emd", description="Eulerian (EMD) or Lagrangian (LMD) map distillation")
    r_max: float = Field(0.99, ge=0, lt=1, description="final tangent-warmup factor (never 1)")
    guidance: float = Field(1.0, description="autoguided teacher λ: v = λ·v_main + (1−λ)·v_weak (needs a `guide` input unless 1)")
    diagonal: float = Field(0.0, ge=0, lt=1, description="share of the batch with s = t (flow matching on the teacher velocity)")
    init_from_teacher: bool = Field(True, description="copy the teacher's weights (s-embedding zero-initialised); a `student` input overrides")
    gan: bool = Field(False, description="adversarial finetune: add a GAN term on few-step samples (discriminator 'disc')")
    gan_steps: int = Field(1, ge=1, description="fakes are k-step flow-map samples, k ~ U{1..gan_steps}")
    adversarial: GANConfig = Field(default_factory=GANConfig, description="settings of the GAN term (gan: true)")


# ----------------------------------------------------------------------------- flow map pieces

def s_label(s: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """Time label of s: ¼·ln max(σ(s), σ_min), σ(s) = s/(1 − s) (finite at s = 0)."""
    return to_edm("fm", s)[1].clamp_min(sigma_min).log() / 4


def D_theta(net: nn.Module, noise, x_t, t, s, **cond) -> torch.Tensor:
    """D_θ(x_t, t; s): the EDM-preconditioned network at σ = t/(1 − t), input x_t/(1 − t)."""
    D = denoiser_in("fm", EDMDenoiser(net, noise), noise.sigma_data)
    return D(x_t, t, s=s_label(s, noise.sigma_min), **cond)


def F_theta(net: nn.Module, noise, x_t, t, s, **cond) -> torch.Tensor:
    """F_θ(x_t, t, s) = (x_t − D_θ(x_t, t; s))/t."""
    t, s = per_sample(t, x_t), per_sample(s, x_t)
    return (x_t - D_theta(net, noise, x_t, t, s, **cond)) / col(t, x_t)


def flow_map(net: nn.Module, noise, x_t, t, s, **cond) -> torch.Tensor:
    """f_θ(x_t, t, s) = x_t + (s − t)·F_θ(x_t, t, s)."""
    t, s = per_sample(t, x_t), per_sample(s, x_t)
    return x_t + col(s - t, x_t) * F_theta(net, noise, x_t, t, s, **cond)


def velocity(D_fm, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """Teacher velocity v(x_t, t) = (x_t − x̂0(x_t, t))/t (D_fm: an EDM denoiser wrapped to FM time)."""
    t = per_sample(t, x_t)
    return (x_t - D_fm(x_t, t, **cond)) / col(t, x_t)


def t_range(noise) -> tuple[float, float]:
    """[t_min, t_max]: σ_min and σ_max in FM time, t = σ/(1 + σ)."""
    t_min, t_max = from_edm("fm", torch.tensor([noise.sigma_min, noise.sigma_max], dtype=torch.float64)).tolist()
    return t_min, t_max


def dF(net, noise, x_t, t, s, tangents, mode="func", eps=1e-3, seed=None, **cond):
    """(F⁻, JVP of F_θ⁻ on (x_t, t, s) along `tangents`), no gradients."""
    fn = lambda x, tt, ss: F_theta(net, noise, x, tt, ss, **cond)  # noqa: E731
    return jvp(fn, (x_t, t, s), tangents, mode=mode, eps=eps, seed=seed)


def tangent_emd(F_minus, v, dF_dt, t, s, r):
    """EMD tangent g = (v − F⁻) + r·(s − t)·dF⁻/dt (= df/dt with the derivative term scaled by r)."""
    return (v - F_minus) + r * col(s - t, v) * dF_dt


def tangent_lmd(F_minus, v_s, dF_ds, t, s, r):
    """LMD tangent g = (v(f⁻, s) − F⁻) − r·(s − t)·∂_s F⁻ (= v(f, s) − ∂_s f, derivative term scaled by r)."""
    return (v_s - F_minus) - r * col(s - t, v_s) * dF_ds


# ----------------------------------------------------------------------------- method

class Method(_Base):
    roles = {
        "teacher": Role("model", method="edm", description="the EDM teacher whose velocity the flow map distils"),
        "student": Role("model", required=False, method="ayf",
                        description="a trained flow map to start from (adversarial finetune, continued training)"),
        "guide": Role("model", required=False, method="edm",
                      description="the weaker EDM model of an autoguided teacher (needed when guidance != 1)"),
    }

    @classmethod
    def required_roles(cls, cfg: Config) -> set[str]:
        return {"teacher"} | ({"guide"} if cfg.guidance != 1.0 else set())

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs["teacher"]
        if "student" in ctx.inputs:
            add_trained_student(self, ctx.inputs["student"])
        else:
            add_two_time_student(self, teacher, cfg.init_from_teacher)
        D_edm = teacher.denoiser()
        if cfg.guidance != 1.0:
            D_edm = autoguided(D_edm, ctx.inputs["guide"].denoiser(), cfg.guidance)
        self.D_fm = denoiser_in("fm", D_edm, ctx.noise.sigma_data)
        self.adv = add_discriminator(self, cfg.adversarial) if cfg.gan else None

    def groups(self):
        return gan_groups(self, self.cfg.adversarial if self.adv is not None else None)

    def fake(self, n_like: torch.Tensor, **cond) -> torch.Tensor:
        """x̂: a k-step flow-map sample from noise, k ~ U{1..gan_steps}; only the last jump carries gradients."""
        k = int(torch.randint(1, self.cfg.gan_steps + 1, ()))
        times = fm_times(self.ctx.noise, k)
        net, noise = self.nets["net"], self.ctx.noise
        x = flow_map_sample(net, noise, torch.randn_like(n_like), times[:-1], **cond)
        return flow_map(net, noise, x, times[-2], times[-1], **cond)

    def sample_ts(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        t_min, t_max = t_range(self.ctx.noise)
        t = t_min + (t_max - t_min) * torch.rand(n, device=device)
        u = torch.rand(n, device=device)
        s = u * t if self.cfg.objective == "emd" else t_min + u * (t - t_min)
        if self.cfg.diagonal > 0:  # s = t: the flow map's velocity F(x, t, t) = v (flow matching)
            s = torch.where(torch.rand(n, device=device) < self.cfg.diagonal, t, s)
        return t, s

    def loss(self, group, batch, step):
        cfg, noise, net = self.cfg, self.ctx.noise, self.nets["net"]
        x0, y = batch["x"], self.labels(batch)
        cond = condition(y)
        if group == "disc":
            with torch.no_grad():
                fake = self.fake(x0, **cond)
            return self.adv.discriminator_loss(x0, fake, y)
        t, s = self.sample_ts(x0.shape[0], x0.device)
        x_t = col(1 - t, x0) * x0 + col(t, x0) * torch.randn_like(x0)
        r = warmup(step, cfg.warmup_steps, cfg.r_max)
        seed = new_seed()
        with same_randomness(seed, x0):
            F = F_theta(net, noise, x_t, t, s, **cond)
        with torch.no_grad():
            if cfg.objective == "emd":
                v = velocity(self.D_fm, x_t, t, **cond)
                F_minus, dF_dt = dF(net, noise, x_t, t, s, (v, torch.ones_like(t), torch.zeros_like(s)),
                                    cfg.jvp, cfg.fd_eps, seed, **cond)
                g = tangent_emd(F_minus, v, dF_dt, t, s, r)
            else:
                F_minus, dF_ds = dF(net, noise, x_t, t, s, (torch.zeros_like(x_t), torch.zeros_like(t), torch.ones_like(s)),
                                    cfg.jvp, cfg.fd_eps, seed, **cond)
                f_minus = x_t + col(s - t, x_t) * F_minus
                g = tangent_lmd(F_minus, velocity(self.D_fm, f_minus, s, **cond), dF_ds, t, s, r)
            g = normalise(g, cfg.tangent_c)
        loss = (F.float() - F_minus.float() - g.float()).pow(2).flatten(1).mean(1).mean()
        logs = {"r": r}
        if self.adv is not None and step >= cfg.adversarial.start:
            l_gan, lam = gan_term(self.adv, cfg.adversarial, loss, self.fake(x0, **cond), x0, y, net)
            logs.update(ayf=loss.detach(), gan=l_gan.detach(), gan_weight=lam)
            loss = loss + lam * l_gan
        return loss, logs


# ----------------------------------------------------------------------------- sampling

def fm_times(noise, nfe: int) -> list[float]:
    """t_max = t_0 > … > t_{nfe−1} (Karras grid of nfe + 1 levels without its last, in FM time), then 0."""
    sig = multistep_sigmas(noise, nfe).double()
    return from_edm("fm", sig).tolist() + [0.0]


@torch.no_grad()
def flow_map_sample(net, noise, z: torch.Tensor, times: list[float], **cond) -> torch.Tensor:
    """x = (1 − t_0)·σ(t_0)·z, then x ← f_θ(x, t_i, t_{i+1}) down to t = 0 (deterministic)."""
    a, sigma = to_edm("fm", torch.tensor(times[0], dtype=torch.float64))
    x = z * float(a * sigma)
    for t, s in zip(times[:-1], times[1:]):
        x = flow_map(net, noise, x, t, s, **cond)
    return x


def consistency_fn(model):
    """f(x, σ) in the EDM convention: f_θ((1 − t)·x, t, 0) at t = σ/(1 + σ)."""
    net, noise = model.nets["net"], model.noise
    return edm_consistency_fn(lambda x_t, t, **cond: flow_map(net, noise, x_t, t, torch.zeros_like(t), **cond), "fm")


def sample(model, z, nfe, class_labels=None):
    return flow_map_sample(model.nets["net"], model.noise, z, fm_times(model.noise, nfe), **condition(class_labels))


# ----------------------------------------------------------------------------- 1D Gaussian check
# Data N(0, c²) in FM time: x_t ~ N(0, std_t²), std_t = √(t² + (1 − t)²c²); the PF-ODE is linear,
# x_s = (std_s/std_t)·x_t. All maps below are linear, so a sampler's output is N(0, a²) and its
# W2 distance to the data is |a − c| (1D Gaussians with equal means).

def gaussian_std(t: float, c: float = 0.5) -> float:
    """std_t = √(t² + (1 − t)²c²)."""
    return math.sqrt(t * t + (1 - t) ** 2 * c * c)


def gaussian_optimal_cm(x_t, t: float, c: float = 0.5):
    """The optimal consistency model f*(x_t, t) = c·x_t/√(t² + (1 − t)²c²)."""
    return c * x_t / gaussian_std(t, c)


def gaussian_flow_map(x_t, t: float, s: float, c: float = 0.5):
    """The exact flow map f(x_t, t, s) = (std_s/std_t)·x_t."""
    return gaussian_std(s, c) / gaussian_std(t, c) * x_t


def gaussian_perturbed_cm(x_t, t: float, c: float = 0.5, delta: float = 0.0):
    """A consistency model with a relative error δ in its F (f = x_t − t·F̃, F̃ = (1 + δ)·F*):
    f = (1 + δ)·f* − δ·x_t. δ = 0 is the optimum."""
    return (1 + delta) * gaussian_optimal_cm(x_t, t, c) - delta * x_t


def gaussian_scaled_cm(x_t, t: float, c: float = 0.5, delta: float = 0.0):
    """A consistency model with a relative error δ in its output x̂0: f = (1 + δ)·f*."""
    return (1 + delta) * gaussian_optimal_cm(x_t, t, c)


def gaussian_perturbed_flow_map(x_t, t: float, s: float, c: float = 0.5, delta: float = 0.0):
    """A flow map with the same relative error in F: f = (1 + δ)·f* − δ·x_t (still f(x, t, t) = x)."""
    return (1 + delta) * gaussian_flow_map(x_t, t, s, c) - delta * x_t


def uniform_times(n: int) -> list[float]:
    """t_i = 1 − i/n, i = 0..n−1 (the multistep times; flow maps then jump to 0)."""
    return [1 - i / n for i in range(n)]


def gaussian_cm_multistep_w2(cm, n_steps: int, c: float = 0.5) -> float:
    """W2 of CM multistep sampling (x = ε at t = 1; x0 = f(x, t_i); x = (1 − t_{i+1})·x0 + t_{i+1}·ε'),
    in closed form by propagating the output std through the linear maps."""
    a = None
    for t in uniform_times(n_steps):
        std_in = 1.0 if a is None else math.sqrt((1 - t) ** 2 * a * a + t * t)
        a = abs(cm(1.0, t)) * std_in  # cm is linear: cm(x, t) = k(t)·x
    return abs(a - c)


def gaussian_flow_map_w2(fmap, n_steps: int, c: float = 0.5) -> float:
    """W2 of deterministic flow-map sampling x ← f(x, t_i, t_{i+1}) from x = ε at t = 1 to 0."""
    times = uniform_times(n_steps) + [0.0]
    k = 1.0
    for t, s in zip(times[:-1], times[1:]):
        k *= fmap(1.0, t, s)
    return abs(abs(k) - c)
