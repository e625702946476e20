"""Consistency distillation (Song et al. 2023, "Consistency Models"; docs/methods.md §1).

    f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, c_noise(σ))
    c_skip = σ_d²/((σ−ε)² + σ_d²),  c_out = σ_d·(σ−ε)/√(σ² + σ_d²)   ⇒ f_θ(x, ε) = x exactly.

Loss (Eq. 7 of the paper, Karras grid σ_0 = σ_max > … > σ_{N−1} = ε):
    i ~ U{0..N−2},  x_i = x + σ_i·z,  x̂ = Heun_teacher(x_i, σ_i → σ_{i+1}),
    L = d(f_θ(x_i, σ_i), stopgrad f_θ⁻(x̂, σ_{i+1})),   θ⁻ ← μ·θ⁻ + (1−μ)·θ.
Online and target passes share the dropout mask. μ = 0 (CIFAR default) makes θ⁻ = stopgrad θ.
The student starts from the teacher's weights.
Sampling: multistep (Alg. 1) on τ = Karras grid of nfe + 1 levels without its last.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..config import Strict
from ..samplers import cm_multistep, heun_step
from .base import Method as _Base
from .base import Role
from .common import (Metric, add_target, col, distance, multistep_sigmas, network_settings, new_seed,
                     same_randomness, update_target)


class Config(Strict):
    name: Literal["cd"] = "cd"
    N: int = Field(18, ge=2, description="number of Karras grid points of the discretisation")
    mu: float = Field(0.0, ge=0, lt=1, description="target-network EMA μ (0: stop-grad online weights)")
    metric: Metric = Field("l2", description="distance d; pseudo-Huber uses c = 0.00054·√dim")
    init_from_teacher: bool = Field(True, description="initialise the student with the teacher's weights")


class ConsistencyFn(torch.nn.Module):
    """f(x, σ) with the boundary-shifted skip/out scalings (f(x, ε) = x)."""

    def __init__(self, net: torch.nn.Module, noise):
        super().__init__()
        self.net, self.noise = net, noise

    def forward(self, x, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        sd, eps = self.noise.sigma_data, self.noise.sigma_min
        c_skip = sd**2 / ((sigma - eps) ** 2 + sd**2)
        c_out = sd * (sigma - eps) / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        F = self.net(col(c_in, x) * x, sigma.log() / 4, **cond)
        return col(c_skip, x) * x + col(c_out, x) * F


class Method(_Base):
    roles = {"teacher": Role("model", method="edm", description="the EDM teacher whose ODE steps CD distils")}

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs["teacher"]
        net_cfg = network_settings(ctx, teacher)
        self.add_net("net", net_cfg, init_from=teacher.nets["net"] if cfg.init_from_teacher else None)
        if cfg.mu > 0:
            add_target(self, net_cfg)
        self.D_teacher = teacher.denoiser()
        self.f = ConsistencyFn(self.nets["net"], ctx.noise)
        self.f_target = ConsistencyFn(self.nets["target"] if cfg.mu > 0 else self.nets["net"], ctx.noise)
        self.sigmas = ctx.noise.karras_sigmas(cfg.N).to(ctx.device)

    def loss(self, group, batch, step):
        x, y = batch["x"], self.labels(batch)
        i = torch.randint(self.cfg.N - 1, (x.shape[0],), device=x.device)
        s_i, s_next = self.sigmas[i], self.sigmas[i + 1]
        x_i = x + col(s_i, x) * torch.randn_like(x)
        with torch.no_grad():
            x_hat = heun_step(self.D_teacher, x_i, s_i, s_next, class_labels=y)
        seed = new_seed()
        with same_randomness(seed, x):  # online and target passes share the dropout mask
            online = self.f(x_i, s_i, class_labels=y)
        with torch.no_grad(), same_randomness(seed, x):
            target = self.f_target(x_hat, s_next, class_labels=y)
        return distance(online, target, self.cfg.metric).mean(), {}

    def after_step(self, step):
        if self.cfg.mu > 0:
            update_target(self.nets["target"], self.nets["net"], self.cfg.mu)


def consistency_fn(model):
    """f(x, σ) of a trained model (EDM convention), e.g. for `fastgen_core.editing`."""
    return ConsistencyFn(model.nets["net"], model.noise)


def sample(model, z, nfe, class_labels=None):
    taus = multistep_sigmas(model.noise, nfe).tolist()
    return cm_multistep(consistency_fn(model), z, taus, model.noise.sigma_min, class_labels=class_labels)
