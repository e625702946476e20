"""Teacher Score Matching (TSM): the warm-up of a student smaller than its teacher in Multi-Student
Distillation (Song et al. 2024; docs/methods.md §8). EDM convention.

The student D_θ (the stage's `network`, randomly initialised) regresses the frozen teacher's
denoiser on noised REAL data (of the student's class group, when the stage sets `classes`) at
every noise level, with EDM's level distribution and weighting (Karras et al. 2022, Eq. 2, 7, 8,
with the teacher's output in place of the clean sample):

    L_TSM = E_{σ, x0, n} λ(σ)·‖D_θ(x0 + σ·n, σ) − D_teacher(x0 + σ·n, σ)‖²,
    ln σ ~ N(P_mean, P_std²),   λ(σ) = (σ² + σ_d²)/(σ·σ_d)².

The result is a (small) diffusion model; a distillation stage then starts its generator from it
(the train stage's `warm_start` input) and runs distribution matching, then DM + GAN (§5). The paper
reports that small students without TSM did much worse [summary]. Sampling: Heun on the Karras grid,
as a teacher (`samplers.teacher_sample`).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..config import Strict
from ..noise import EDMDenoiser
from ..samplers import teacher_sample
from .base import Method as _Base
from .base import Role
from .common import col, condition, network_settings


class Config(Strict):
    name: Literal["tsm"] = "tsm"


class Method(_Base):
    roles = {"teacher": Role("model", method="edm", description="the EDM teacher whose denoiser the student regresses")}

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs["teacher"]
        self.add_net("net", network_settings(ctx, teacher))   # random initialisation (smaller than the teacher)
        self.D = EDMDenoiser(self.nets["net"], ctx.noise)
        self.D_teacher = teacher.denoiser()

    def loss(self, group, batch, step):
        x0, cond = batch["x"], condition(self.labels(batch))
        noise = self.ctx.noise
        sigma = noise.sample_sigma(x0.shape[0], device=x0.device)
        x = x0 + col(sigma, x0) * torch.randn_like(x0)
        with torch.no_grad():
            target = self.D_teacher(x, sigma, **cond)
        per = ((self.D(x, sigma, **cond) - target) ** 2).flatten(1).mean(1)
        return (noise.loss_weight(sigma) * per).mean(), {}


def sample(model, z, nfe, class_labels=None):
    return teacher_sample(model.denoiser(), z, model.noise, nfe, class_labels=class_labels)
