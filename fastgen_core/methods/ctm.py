"""Consistency Trajectory Models (Kim et al. 2023, "Consistency Trajectory Model: Learning
Probability Flow ODE Trajectory of Diffusion"; docs/methods.md §10). EDM convention (σ = t).

    G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s)        ⇒ G_θ(x, t, t) = x exactly,
    g_θ(x_t, t, s) = c_skip(t)·x_t + c_out(t)·F_θ(c_in(t)·x_t, ¼ln t, s-label ¼ln s)
(EDM preconditioning in t; the network gets a second time embedding, NetworkConfig.second_time).
g_θ(x, t, t) is a denoiser (s → t makes G a score/Euler step), G(·, t, s) jumps along the PF-ODE.

Loss (soft consistency matching), times on the Karras grid σ_0 = σ_max > … > σ_{N−1} = σ_min, as
CTM's public code draws them (docs/methods.md §10):
    one teacher step count per iteration  k ~ p(k) ∝ k on 1..K  (K = max_teacher_steps, default N − 1),
    per sample  n_t ~ U{0..N−1−k},  n_u = n_t + k,  n_s ~ U{n_u..N−1};  t, u, s = σ_{n_t}, σ_{n_u}, σ_{n_s},
    x_t = x0 + t·z,  x_u = k teacher Heun steps along the grid from t to u (`samplers.heun_step`), no gradients,
    L_CTM = d( G_θ⁻(G_θ(x_t, t, s), s, σ_min),  stopgrad G_θ⁻(G_sg(θ)(x_u, u, s), s, σ_min) )
with θ⁻ the EMA target network and the target's inner jump by the stop-gradient ONLINE network
(`target_inner: online`; "ema" uses θ⁻ for both jumps). Both sides are compared in data space at
σ_min; gradients flow through the inner G_θ of the estimate only.
Auxiliary DSM on g_θ(x, σ, σ) keeps the denoiser (EDM weighting λ(σ)); σ is drawn as CTM's
"halflognormal" sampler: the first half of the batch ln σ ~ N(P_mean, P_std²), the rest the Karras
level at a continuous grid position r ~ U[0, dsm_upper] (the upper part of the grid, σ_max side):
    σ = (σ_max^{1/ρ} + r·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.
It is balanced against L_CTM by the adaptive weight of the output layer W (`dsm_balance: adaptive`):
    L = L_CTM + dsm_weight·λ_DSM·L_DSM,   λ_DSM = ‖∇_W L_CTM‖/(‖∇_W L_DSM‖ + 10⁻⁴) clamped to [0, 10⁴], detached.
Optional GAN term on real data (`gan: true`; `fastgen_core/gan.py`): a discriminator network
"disc" (its own optimiser group, not exported, saved in checkpoints) is trained on real data x0
against the student's detached data-space estimates x̂, and from iteration `adversarial.start` the
generator loss becomes
    L = L_CTM + dsm_weight·λ_DSM·L_DSM + λ_GAN·L_G(x̂),   λ_GAN = weight·clip(‖∇_W L_CTM‖/(‖∇_W L_G‖ + 1e-4))
with W the last layer of θ (CTM's code: adaptive weight from the consistency loss only, clipped to
[0.01, 10]; hinge losses with a StyleGAN-XL projected discriminator on clean images).
The fakes (`gan_time`): "max" (default) are 1-step samples x̂ = G_θ(x0 + σ_max·z, σ_max, σ_min),
our reading of CTM's code with `gan_specific_time` and gan_num_heun_step = N − 1 (the GAN's t is
drawn so that t + gan_num_heun_step stays on the grid, i.e. t = σ_max; (unconfirmed)); "ctm"
reuses the consistency estimate x̂ = G_θ⁻(G_θ(x_t, t, s), s, σ_min) at the loss's own (t, s)
(`gan_fake_inner_type=model`, `gan_fake_outer_type=target_model_sg` without specific times).
Online and target passes share the dropout mask. The student starts from the teacher: its
weights are copied and the new s-embedding (`embed.map_s`) is zero-initialised, so at the start
g_θ(x, t, s) = D_teacher(x, t) and G is one DDIM/Euler step of the teacher from t to s.

γ-sampling (the paper's Alg. of γ-sampling): times t_0 = σ_max > … > t_N = σ_min (Karras grid
of N + 1 levels),  s = √(1−γ²)·(t_{n+1} − σ_min) + σ_min,
    x ← G(x, t_n, s) + √(t_{n+1}² − s²)·z_n.
γ = 0: deterministic long jumps (N NFE); γ = 1: s = σ_min, i.e. CM multistep sampling with
f(x, t) = G(x, t, σ_min). `sample` (γ = 0) is sony/ctm's sampler for CTM at n NFE (its `exact`
sampler with its default empty `ts`): n jumps G(x, t_i, t_{i+1}) along the Karras grid of n + 1 levels
from σ_max to σ_min, on the exported (EMA) weights; the times need not lie on the training grid of N
levels (docs/methods.md §10; docs/results.md "Toy CTM from 1 to 8 steps").
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import nn

from ..config import FieldError, Strict
from ..gan import GANConfig, adaptive_weight, add_discriminator, gan_groups, gan_term, last_layer
from ..samplers import heun_step
from .base import Method as _Base
from .base import Role
from .common import (Metric, add_target, add_two_time_student, col, condition, distance, new_seed, per_sample,
                     same_randomness, update_target)


class Config(Strict):
    name: Literal["ctm"] = "ctm"
    N: int = Field(18, ge=2, description="Karras grid levels of the discretisation (sony/ctm on CIFAR-10: 18)")
    max_teacher_steps: int | None = Field(None, ge=1, description="K: most teacher Heun steps k of one iteration, k drawn once per iteration on 1..K (None: N − 1, sony/ctm's num_heun_step; at most N − 1)")
    k_law: Literal["weighted", "uniform"] = Field("weighted", description="law of k on 1..K: p(k) ∝ k (sony/ctm's heun_step_strategy 'weighted') or uniform")
    target_inner: Literal["online", "ema"] = Field("online", description="network of the target's inner jump G(x_u, u, s): the stop-grad online network (sony/ctm) or the EMA target θ⁻")
    mu: float = Field(0.999, ge=0, lt=1, description="EMA μ of the target network θ⁻ of the outer jumps (sony/ctm: 0.999, fixed)")
    metric: Metric = Field("l2", description="distance d in data space (LPIPS at scale)")
    dsm_weight: float = Field(1.0, ge=0, description="weight of the DSM term, times λ_DSM (sony/ctm's denoising_weight: 1; 0 switches DSM off)")
    dsm_balance: Literal["adaptive", "fixed"] = Field("adaptive", description="λ_DSM: ‖∇_W L_CTM‖/(‖∇_W L_DSM‖ + 1e-4) on the output layer W (sony/ctm), or fixed at 1")
    dsm_sigma: Literal["half_uniform", "lognormal"] = Field("half_uniform", description="DSM noise levels: half from the EDM training law, half uniform over the upper dsm_upper of the grid (sony/ctm), or all from the training law")
    dsm_upper: float = Field(0.7, gt=0, le=1, description="share of the grid, from σ_max in σ^(1/ρ), of the uniform half of the DSM levels (sony/ctm's diffusion_mult)")
    gan: bool = Field(False, description="add the GAN term on real data (discriminator network 'disc')")
    adversarial: GANConfig = Field(default_factory=GANConfig, description="settings of the GAN term (gan: true)")
    gan_time: Literal["max", "ctm"] = Field("max", description="GAN fakes: 1-step samples from σ_max, or the consistency estimate at the loss's (t, s)")
    gamma: float = Field(0.0, ge=0, le=1, description="γ of γ-sampling (0: deterministic, 1: CM multistep)")
    init_from_teacher: bool = Field(True, description="copy the teacher's weights (s-embedding zero-initialised)")

    @model_validator(mode="after")
    def _k_fits_the_grid(self):
        if self.max_teacher_steps is not None and self.max_teacher_steps > self.N - 1:
            raise FieldError("max_teacher_steps", f"{self.max_teacher_steps} is more than N − 1 = {self.N - 1}: "
                             "k teacher steps from t must stay on the N-level grid")
        return self


class TrajectoryFn(nn.Module):
    """G_θ(x, t, s) and g_θ(x, t, s) of a raw network with a second time input."""

    def __init__(self, net: nn.Module, noise):
        super().__init__()
        self.net, self.noise = net, noise

    def g(self, x, t, s, **cond):
        """g_θ = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, ¼ln t, ¼ln s)."""
        t, s = per_sample(t, x), per_sample(s, x)
        c_skip, c_out, c_in, c_noise = self.noise.precond(t)
        F = self.net(col(c_in, x) * x, c_noise, s=s.log() / 4, **cond)
        return col(c_skip, x) * x + col(c_out, x) * F

    def forward(self, x, t, s, **cond):
        """G_θ = (s/t)·x + (1 − s/t)·g_θ(x, t, s)."""
        t, s = per_sample(t, x), per_sample(s, x)
        ratio = col(s / t, x)
        return ratio * x + (1 - ratio) * self.g(x, t, s, **cond)


def teacher_solve(D, x: torch.Tensor, sigmas: torch.Tensor, n_from: torch.Tensor, n_to: torch.Tensor,
                  max_steps: int, **cond) -> torch.Tensor:
    """Heun steps along the grid from σ_{n_from} to σ_{n_to} per sample (n_to − n_from ≤ max_steps);
    always max_steps steps, samples past their n_to held (no early stop: deciding it would read the
    device every step; the training loss calls it with n_to − n_from = max_steps)."""
    last = len(sigmas) - 2
    for k in range(max_steps):
        active = (n_from + k) < n_to
        idx = (n_from + k).clamp(max=last)
        x = torch.where(col(active, x), heun_step(D, x, sigmas[idx], sigmas[idx + 1], **cond), x)
    return x


def p_k(K: int, law: str = "weighted") -> torch.Tensor:
    """The law of the teacher step count k on 1..K: p(k) = k/Σk ("weighted", sony/ctm) or 1/K."""
    w = torch.arange(1, K + 1, dtype=torch.float64) if law == "weighted" else torch.ones(K, dtype=torch.float64)
    return w / w.sum()


def dsm_sigmas(n: int, noise, law: str = "half_uniform", upper: float = 0.7, device=None) -> torch.Tensor:
    """Noise levels of the DSM term. "half_uniform" (sony/ctm's HalfLogNormalHalfUniformSampler): the first
    n//2 from the EDM training law ln σ ~ N(P_mean, P_std²), the rest at a continuous grid position
    r ~ U[0, upper]: σ = (σ_max^{1/ρ} + r·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ. "lognormal": all from the training law."""
    if law == "lognormal":
        return noise.sample_sigma(n, device=device)
    lognormal = noise.sample_sigma(n // 2, device=device)
    r = upper * torch.rand(n - n // 2, device=device)
    lo, hi = noise.sigma_min ** (1 / noise.rho), noise.sigma_max ** (1 / noise.rho)
    return torch.cat([lognormal, (hi + r * (lo - hi)) ** noise.rho])


class Method(_Base):
    roles = {"teacher": Role("model", method="edm", description="the EDM teacher whose Heun steps give x_u")}

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs["teacher"]
        net_cfg = add_two_time_student(self, teacher, cfg.init_from_teacher)
        add_target(self, net_cfg)
        self.G = TrajectoryFn(self.nets["net"], ctx.noise)
        self.G_target = TrajectoryFn(self.nets["target"], ctx.noise)
        self.D_teacher = teacher.denoiser()
        self.sigmas = ctx.noise.karras_sigmas(cfg.N).to(ctx.device)
        self.K = cfg.max_teacher_steps or cfg.N - 1
        self.p_k = p_k(self.K, cfg.k_law)
        self.adv = add_discriminator(self, cfg.adversarial) if cfg.gan else None

    def groups(self):
        return gan_groups(self, self.cfg.adversarial if self.adv is not None else None)

    def draw_k(self, device) -> int:
        """One teacher step count per iteration, k ~ p(k), the same on every rank (sony/ctm broadcasts
        rank 0's)."""
        k = torch.multinomial(self.p_k, 1) + 1  # on the CPU: one process reads it without waiting on a GPU
        if dist.is_available() and dist.is_initialized():
            k = k.to(device)
            dist.broadcast(k, src=0)
        return int(k)

    def indices(self, n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n_t ~ U{0..N−1−k}, n_u = n_t + k, n_s ~ U{n_u..N−1} per sample (sony/ctm's `sample_t`, `sample_s`)."""
        N = self.cfg.N
        n_t = torch.randint(N - k, (n,), device=device)
        n_u = n_t + k
        n_s = n_u + (torch.rand(n, device=device) * (N - n_u)).long().clamp(max=N - 1 - n_u)
        return n_t, n_u, n_s

    def x_hat(self, x_t, t, s, **cond):
        """The student's data-space estimate x̂ = G_θ⁻(G_θ(x_t, t, s), s, σ_min)."""
        return self.G_target(self.G(x_t, t, s, **cond), s, self.ctx.noise.sigma_min, **cond)

    @torch.no_grad()
    def target(self, x_u, u, s, **cond):
        """stopgrad G_θ⁻(G(x_u, u, s), s, σ_min), the inner G by the online network (`target_inner: online`)
        or by θ⁻ ("ema")."""
        inner = self.G if self.cfg.target_inner == "online" else self.G_target
        return self.G_target(inner(x_u, u, s, **cond), s, self.ctx.noise.sigma_min, **cond)

    def one_step(self, x0, **cond):
        """A 1-step sample G_θ(x0 + σ_max·z, σ_max, σ_min) (the GAN's fakes with gan_time "max")."""
        T = self.sigmas[0]
        return self.G(x0 + T * torch.randn_like(x0), T, self.ctx.noise.sigma_min, **cond)

    def l_dsm(self, x0, **cond):
        """L_DSM = E λ(σ)·mean‖g_θ(x0 + σ·n, σ, σ) − x0‖², σ from `dsm_sigmas`."""
        noise, cfg = self.ctx.noise, self.cfg
        sigma = dsm_sigmas(x0.shape[0], noise, cfg.dsm_sigma, cfg.dsm_upper, x0.device)
        g = self.G.g(x0 + col(sigma, x0) * torch.randn_like(x0), sigma, sigma, **cond)
        return (noise.loss_weight(sigma) * ((g - x0) ** 2).flatten(1).mean(1)).mean()

    def dsm_term(self, l_ctm, x0, **cond) -> tuple[torch.Tensor, dict]:
        """dsm_weight·λ_DSM·L_DSM, λ_DSM = ‖∇_W L_CTM‖/(‖∇_W L_DSM‖ + 1e-4) clamped to [0, 1e4] (adaptive) or 1."""
        l_dsm = self.l_dsm(x0, **cond)
        lam = 1.0
        if self.cfg.dsm_balance == "adaptive":
            lam = adaptive_weight(l_ctm, l_dsm, last_layer(self.nets["net"]), (0.0, 1e4))
        return self.cfg.dsm_weight * lam * l_dsm, {"dsm": l_dsm.detach(), "dsm_balance": lam}

    def loss(self, group, batch, step):
        x0, y = batch["x"], self.labels(batch)
        cond = condition(y)
        sig = self.sigmas
        k = self.draw_k(x0.device)
        n_t, n_u, n_s = self.indices(x0.shape[0], k, x0.device)
        t, u, s = sig[n_t], sig[n_u], sig[n_s]
        x_t = x0 + col(t, x0) * torch.randn_like(x0)
        if group == "disc":
            with torch.no_grad():
                fake = self.one_step(x0, **cond) if self.cfg.gan_time == "max" else self.x_hat(x_t, t, s, **cond)
            return self.adv.discriminator_loss(x0, fake, y)
        with torch.no_grad():
            x_u = teacher_solve(self.D_teacher, x_t, sig, n_t, n_u, k, **cond)
        seed = new_seed()
        with same_randomness(seed, x0):
            online = self.x_hat(x_t, t, s, **cond)
        with same_randomness(seed, x0):
            target = self.target(x_u, u, s, **cond)
        l_ctm = distance(online, target, self.cfg.metric).mean()
        loss, logs = l_ctm, {"ctm": l_ctm.detach(), "k": k}
        if self.cfg.dsm_weight > 0:
            term, dsm_logs = self.dsm_term(l_ctm, x0, **cond)
            loss = loss + term
            logs.update(dsm_logs)
        if self.adv is not None and step >= self.cfg.adversarial.start:
            fake = self.one_step(x0, **cond) if self.cfg.gan_time == "max" else online
            l_gan, lam = gan_term(self.adv, self.cfg.adversarial, l_ctm, fake, x0, y, self.nets["net"])
            loss = loss + lam * l_gan
            logs.update(gan=l_gan.detach(), gan_weight=lam)
        return loss, logs

    def after_step(self, step):
        update_target(self.nets["target"], self.nets["net"], self.cfg.mu)


# ----------------------------------------------------------------------------- sampling

def gamma_s(t_next: float, gamma: float, sigma_min: float) -> float:
    """s = √(1−γ²)·(t_{n+1} − σ_min) + σ_min."""
    return (1 - gamma**2) ** 0.5 * (t_next - sigma_min) + sigma_min


@torch.no_grad()
def gamma_sample(G, z: torch.Tensor, times: list[float], gamma: float, sigma_min: float, **cond) -> torch.Tensor:
    """γ-sampling from x = t_0·z over times t_0 > … > t_N = σ_min (N evaluations of G):
    x ← G(x, t_n, s) + √(t_{n+1}² − s²)·z_n. One z_n is drawn per step, also when its scale is 0,
    so γ = 1 consumes the random stream exactly like `samplers.cm_multistep`."""
    x = z * times[0]
    for t_cur, t_next in zip(times[:-1], times[1:]):
        s = gamma_s(t_next, gamma, sigma_min)
        x = G(x, per_sample(t_cur, x), per_sample(s, x), **cond)
        n = torch.randn_like(x)
        x = x + max(t_next**2 - s**2, 0.0) ** 0.5 * n
    return x


def consistency_fn(model):
    """f(x, σ) = G(x, σ, σ_min): the CTM used as a consistency model (EDM convention)."""
    G = TrajectoryFn(model.nets["net"], model.noise)
    return lambda x, sigma, **cond: G(x, sigma, model.noise.sigma_min, **cond)


def sample(model, z, nfe, class_labels=None):
    times = model.noise.karras_sigmas(nfe + 1).tolist()
    times[-1] = model.noise.sigma_min
    cond = condition(class_labels)
    G = TrajectoryFn(model.nets["net"], model.noise)
    return gamma_sample(G, z, times, model.cfg.gamma, model.noise.sigma_min, **cond)
