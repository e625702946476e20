"""EDM teacher: denoising score matching with EDM preconditioning (Karras et al. 2022, Eq. 2, 7, 8).

    L = E_{σ, x0, n} λ(σ)·‖D_θ(x0 + σ·n, σ) − x0‖²,  ln σ ~ N(P_mean, P_std²),
    λ(σ) = (σ² + σ_d²)/(σ·σ_d)²,   D_θ = c_skip·x + c_out·F_θ(c_in·x, c_noise).

Sampling: Heun on the Karras grid (`samplers.teacher_sample`).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..config import Strict
from ..noise import EDMDenoiser
from ..samplers import teacher_sample
from .base import Method as _Base
from .common import col


class Config(Strict):
    name: Literal["edm"] = "edm"
    label_dropout: float = Field(0.0, ge=0, lt=1, description="probability of dropping the class label (enables CFG)")


def drop_labels(y: torch.Tensor | None, p: float, num_classes: int) -> torch.Tensor | None:
    """Replace each label by the null label `num_classes` with probability p."""
    if y is None or p == 0:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, num_classes), y)


class Method(_Base):
    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        self.add_net("net", ctx.network)
        self.D = EDMDenoiser(self.nets["net"], ctx.noise)

    def loss(self, group, batch, step):
        x0, y = batch["x"], drop_labels(self.labels(batch), self.cfg.label_dropout, self.ctx.data.num_classes)
        noise = self.ctx.noise
        sigma = noise.sample_sigma(x0.shape[0], device=x0.device)
        D = self.D(x0 + col(sigma, x0) * torch.randn_like(x0), sigma, class_labels=y)
        per = ((D - x0) ** 2).flatten(1).mean(1)
        return (noise.loss_weight(sigma) * per).mean(), {}


def sample(model, z, nfe, class_labels=None):
    return teacher_sample(model.denoiser(), z, model.noise, nfe, class_labels=class_labels)
