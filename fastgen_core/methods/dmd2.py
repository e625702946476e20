"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis";
docs/methods.md §5). EDM convention. The distribution-matching gradient, the fake critic's loss, the
noise grid and the guided real score are DMD's (`methods/dmd.py`); DMD2 drops the regression loss and
adds:

Two time-scale update rule: the critic (and the GAN head) step more often than the generator, ratio
`ratio` (5 in DMD2's ImageNet and SDXL scripts). Two schedules, both through the loop's groups:
    schedule "dmd2"      (DMD2's code): generator at step % ratio == 0, critic EVERY step (after the
                         generator on shared steps);
    schedule "alternate" (FastGen): generator at step % ratio == 0, critic on the other steps only
                         (1 generator : ratio − 1 critic steps).
GAN (`gan: true`): a classifier head C (`gan.FeatureHead`) on the FAKE critic's bottleneck features
(`return_features=True` of the network), read at σ_min (clean inputs; DMD2's code queries the critic
at the smallest grid level), or, with `gan_noised`, at σ_(i), i ~ U{0 … gan_noise_levels − 1} of the
ascending grid, inputs noised to it (DMD2's diffusion GAN). Softplus losses (Goodfellow et al.):
    classifier (critic group):  L_C = softplus(C(fake)) + softplus(−C(real))  — updates the head AND
                                the critic backbone: L_critic = L_fake + gan_cls_weight·L_C (1e-2);
    generator:                  L_G = L_DM + gan_gen_weight·softplus(−C(G(z)))  (3e-3); the critic
                                and the head are frozen while it is evaluated, so the generator's
                                loss never updates them.
Multi-step generator (`steps` K > 1) at the levels σ_0 = σ_max > … > σ_{K−1} of `dmd.generator_sigmas`
(DMD2's 999, 749, 499, 249 of 1000): the generator maps x_k at σ_k to x̂ = D_θ(x_k, σ_k). Its
training input (`inputs`):
    "backward" (DMD2, backward simulation): one k ~ U{0 … K−1} per iteration, x_0 = σ_max·z and
               x_{j+1} = D_θ(x_j, σ_j) + σ_{j+1}·ε_j for j < k, rolled out without gradients;
    "real"     (FastGen): real data noised to a level of the list, x_k = x + σ_k·ε, k ~ U{0 … K−1}
               per sample.
The critic trains on the generator's outputs at the same inputs (stop-grad). Optimiser: AdamW (0.9,
0.999), weight decay 0.01, grad clip 10 (DMD2's code) — the stage's `train` settings.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import FieldError
from ..gan import FeatureHead, d_loss, frozen, g_loss
from .base import Group
from .common import col, condition
from .dmd import DistributionMatching, DMSettings, generator_sigmas
from .dmd import sample  # noqa: F401  (a DMD2 generator samples as DMD's: docs/methods.md §5)


class Config(DMSettings):
    name: Literal["dmd2"] = "dmd2"
    ratio: int = Field(5, ge=1, description="two time-scale update rule: the generator steps every `ratio` iterations")
    schedule: Literal["dmd2", "alternate"] = Field("dmd2", description="dmd2: the critic steps every iteration (DMD2's code); alternate: the critic steps only when the generator does not (FastGen)")
    gan: bool = Field(False, description="GAN classifier head on the fake critic's bottleneck features")
    gan_gen_weight: float = Field(3e-3, ge=0, description="weight of the generator's GAN loss (DMD2 ImageNet: 3e-3)")
    gan_cls_weight: float = Field(1e-2, ge=0, description="weight of the classifier loss in the critic's loss (DMD2: 1e-2)")
    gan_noised: bool = Field(False, description="classifier inputs noised at a random grid level below gan_noise_levels (DMD2's diffusion GAN)")
    gan_noise_levels: int | None = Field(None, ge=1, description="gan_noised: levels i ~ U{0 … gan_noise_levels − 1} of the ascending grid (None: the whole grid)")
    head_width: int = Field(64, gt=0, description="width of the GAN classifier head")
    steps: int = Field(1, ge=1, description="K: generator steps (1: one-step generator)")
    inputs: Literal["backward", "real"] = Field("backward", description="multi-step training inputs: backward simulation from pure noise (DMD2) or noised real data (FastGen)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.schedule == "alternate" and self.ratio < 2:
            raise FieldError("ratio", "schedule 'alternate' needs ratio ≥ 2 (with 1 the critic would never step)")
        if self.gan_noise_levels is not None and self.gan_noise_levels > self.grid:
            raise FieldError("gan_noise_levels", f"{self.gan_noise_levels} is more than the grid's {self.grid} levels")
        if self.steps > self.grid:
            raise FieldError("steps", f"{self.steps} generator steps do not fit a grid of {self.grid} levels")
        return self


@torch.no_grad()
def backward_simulate(G, z: torch.Tensor, sigmas: torch.Tensor, k: int, **cond) -> torch.Tensor:
    """The generator's k-th input rolled out from pure noise without gradients: x_0 = σ_0·z,
    x_{j+1} = G(x_j, σ_j) + σ_{j+1}·ε_j for j < k (DMD2's backward simulation)."""
    x = sigmas[0] * z
    for j in range(k):
        x = G(x, sigmas[j].expand(x.shape[0]), **cond) + sigmas[j + 1] * torch.randn_like(x)
    return x


class Method(DistributionMatching):
    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        self.gen_sigmas = generator_sigmas(ctx.noise, cfg.grid, cfg.steps).to(ctx.device)
        if cfg.gan:
            with torch.no_grad():
                probe = torch.zeros((1, *ctx.data.shape), device=ctx.device)
                y = torch.zeros(1, dtype=torch.long, device=ctx.device) if ctx.data.num_classes else None
                shape = self.features(probe, self.levels[:1], **condition(y)).shape[1:]
            self.nets["head"] = FeatureHead(tuple(shape), cfg.head_width).to(ctx.device)
            self.resume = ("critic", "head")

    def groups(self) -> list[Group]:
        cfg = self.cfg
        critic = list(self.nets["critic"].parameters()) + (list(self.nets["head"].parameters()) if cfg.gan else [])
        return [Group("net", list(self.nets["net"].parameters()), every=cfg.ratio),
                Group("critic", critic, lr_scale=cfg.critic_lr_scale,
                      skip_every=cfg.ratio if cfg.schedule == "alternate" else 0)]

    # --- GAN ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """The fake critic's bottleneck features at (x, σ) under EDM preconditioning."""
        _, _, c_in, c_noise = self.ctx.noise.precond(sigma.expand(x.shape[0]))
        return self.nets["critic"](col(c_in, x) * x, c_noise, return_features=True, **cond)

    def logits(self, x: torch.Tensor, **cond) -> torch.Tensor:
        """C(x): the head on the critic's features, at σ_min (clean) or, noised, at a random
        level of the grid's first `gan_noise_levels` (all of it by default)."""
        n = x.shape[0]
        if self.cfg.gan_noised:
            i = torch.randint(self.cfg.gan_noise_levels or self.cfg.grid, (n,), device=x.device)
            sigma = self.levels[i]
            x = x + col(sigma, x) * torch.randn_like(x)
        else:
            sigma = self.levels[:1].expand(n)
        return self.nets["head"](self.features(x, sigma, **cond))

    # --- the generator's inputs ----------------------------------------------------------
    def generator_input(self, batch: dict, **cond) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(x_k, σ_k per sample, logs): σ_max·z for a 1-step generator; else backward simulation
        (one k per iteration) or noised real data (k per sample)."""
        x0 = batch["x"]
        n, K, s = x0.shape[0], self.cfg.steps, self.gen_sigmas
        z = torch.randn_like(x0)
        if K == 1:
            return s[0] * z, s[:1].expand(n), {}
        if self.cfg.inputs == "real":
            k = torch.randint(K, (n,), device=x0.device)
            return x0 + col(s[k], x0) * z, s[k], {}
        k = int(torch.randint(K, ()))
        return backward_simulate(self.G, z, s, k, **cond), s[k].expand(n), {"k": k}

    # --- losses --------------------------------------------------------------------------
    def loss(self, group, batch, step):
        cfg, y = self.cfg, self.labels(batch)
        cond = condition(y)
        x_in, sigma, logs = self.generator_input(batch, **cond)
        if group == "critic":
            with torch.no_grad():
                x = self.G(x_in, sigma, **cond)
            loss = self.critic_term(x, **cond)
            logs = {**logs, "fake": loss.detach()}
            if cfg.gan:
                real, fake = self.logits(batch["x"], **cond), self.logits(x, **cond)
                l_cls = d_loss(real, fake, "softplus")
                loss = loss + cfg.gan_cls_weight * l_cls
                logs.update(cls=l_cls.detach(), cls_acc=torch.cat([real > 0, fake <= 0]).float().mean())
            return loss, logs
        x = self.G(x_in, sigma, **cond)
        loss, dm_logs = self.dm_term(x, **cond)
        logs = {**logs, **dm_logs, "dm": loss.detach()}
        if cfg.gan:
            with frozen(self.nets["critic"]), frozen(self.nets["head"]):
                l_gan = g_loss(self.logits(x, **cond), "softplus")
            loss = loss + cfg.gan_gen_weight * l_gan
            logs["gan"] = l_gan.detach()
        return loss, logs

    def meta(self) -> dict:
        return {"generator_sigmas": [round(float(s), 6) for s in self.gen_sigmas]}
