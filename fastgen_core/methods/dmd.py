"""Distribution Matching Distillation (Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation"; docs/methods.md §6), and the distribution-matching pieces DMD2 shares (§5,
`methods/dmd2.py`). EDM convention (x_σ = x + σ·ε).

Generator: the teacher's EDM denoiser, copied, queried at the top of the grid,
    G_θ(z) = D_θ(σ_max·z, σ_max)                  (DMD2's EDM code: input σ_max·z at σ = σ_max).
Noise grid: the Karras grid of `grid` = 1000 levels, indexed as DMD2's code does, small σ first:
    σ_(0) = σ_min < … < σ_(grid−1) = σ_max.
Distribution-matching gradient (DMD Eq. 7–8; DMD2's `compute_distribution_matching_loss`):
    x = G_θ(z),  i ~ U{⌊0.02·grid⌋ … ⌊0.98·grid⌋},  x_t = x + σ_(i)·ε,
    p_real = x − μ_real(x_t, σ_(i)),   p_fake = x − μ_fake(x_t, σ_(i)),
    g = (p_real − p_fake) / mean|p_real|      (per sample, over all non-batch dims; NaN → 0)
    L_DM = ½·mean (x − stopgrad(x − g))²       (so ∇_x L_DM = g / numel)
μ_real is the frozen teacher, optionally guided (`real_guidance` w: classifier-free guidance of a
class-conditional teacher trained with label dropout, or autoguidance with a weak `guide` input,
docs/methods.md §12); μ_fake is the fake critic (initialised from the teacher, never guided).
Fake critic (DMD2's `compute_loss_fake`): denoising loss on stop-grad generator samples over the
FULL grid, i ~ U{0 … grid−1}, with the EDM weighting
    L_fake = mean (σ⁻² + σ_d⁻²)·(μ_fake(sg(x) + σ·ε, σ) − sg(x))².
DMD's regression loss on the teacher's ODE couplings (z, y) of an `ode_pairs` stage (DMD Eq. 9;
LPIPS at scale, l2 or pseudo-Huber here): the pair's standard-normal z enters the generator exactly
as its training noise does, σ_max·z:
    L_reg = d(G_θ(z), y),     L_G = L_DM + λ_reg·L_reg   (λ_reg = 0.25).
DMD steps the generator and the critic once each per iteration (1:1), generator first.
Sampling: x = σ_0·z, x̂ = D_θ(x, σ_0); for a K-step generator, re-noise x = x̂ + σ_k·ε and denoise
again at the generator's levels (`generator_sigmas`; 1 NFE: x̂ = G_θ(z)).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import FieldError, Strict
from ..noise import EDMDenoiser
from ..samplers import autoguided, cfg_guided, cm_multistep
from .base import Method as _Base
from .base import Group, Role
from .common import Metric, col, condition, distance, network_settings

__all__ = ["DMSettings", "Config", "DistributionMatching", "Method", "karras_ascending", "dm_levels",
           "dm_gradient", "dm_loss", "critic_loss", "real_score", "generator_sigmas", "sample"]


class DMSettings(Strict):
    """Settings DMD and DMD2 share (docs/methods.md §5, §6)."""

    name: str = Field(..., description="the method")
    grid: int = Field(1000, ge=10, description="levels of the Karras noise grid the DM loss, the critic and the generator's steps index (DMD2's num_train_timesteps)")
    dm_range: tuple[float, float] = Field((0.02, 0.98), description="share of the grid (from σ_min) the DM loss draws its levels from (DMD2's min/max_step_percent)")
    real_guidance: float = Field(1.0, gt=0, description="guidance weight w of the real score μ_real (1: the teacher unguided)")
    guidance: Literal["cfg", "auto"] = Field("cfg", description="real-score guidance: classifier-free (class-conditional teacher with label dropout) or autoguidance (needs a `guide` input, a weak_snapshot stage)")
    critic_lr_scale: float = Field(1.0, gt=0, description="fake critic learning rate = critic_lr_scale × the stage's lr")
    init_from_teacher: bool = Field(True, description="initialise the generator with the teacher's weights (the critic always is)")

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.dm_range
        if not 0 <= lo < hi <= 1:
            raise FieldError("dm_range", f"needs 0 ≤ low < high ≤ 1, got {list(self.dm_range)}")
        return self


class Config(DMSettings):
    name: Literal["dmd"] = "dmd"
    reg_weight: float = Field(0.25, ge=0, description="λ_reg of the regression loss on the `pairs` input (0: no regression, no pairs needed)")
    metric: Metric = Field("l2", description="distance d of the regression loss (LPIPS at scale)")


# ----------------------------------------------------------------------------- the math

def karras_ascending(noise, grid: int) -> torch.Tensor:
    """The Karras grid of `grid` levels, small σ first (DMD2's `karras_sigmas`)."""
    return noise.karras_sigmas(grid).flip(0)


def dm_levels(n: int, grid: int, dm_range=(0.02, 0.98), device=None) -> torch.Tensor:
    """Indices i ~ U{⌊lo·grid⌋ … min(⌊hi·grid⌋, grid − 1)} into the ascending grid (DMD2's code)."""
    lo, hi = int(dm_range[0] * grid), int(dm_range[1] * grid)
    return torch.randint(lo, min(hi + 1, grid), (n,), device=device)


@torch.no_grad()
def dm_gradient(x: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, mu_real, mu_fake, **cond) -> torch.Tensor:
    """g = (p_real − p_fake)/mean|p_real| per sample with p = x − μ(x_t, σ); NaN → 0, ±inf → ±max (DMD Eq. 7–8)."""
    p_real = x - mu_real(x_t, sigma, **cond)
    p_fake = x - mu_fake(x_t, sigma, **cond)
    scale = p_real.abs().flatten(1).mean(1)
    return torch.nan_to_num((p_real - p_fake) / col(scale, x))


def dm_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """L_DM = ½·mean (x − stopgrad(x − g))², whose gradient in x is g/numel."""
    return 0.5 * ((x - (x - g).detach()) ** 2).mean()


def critic_loss(mu_fake, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float, **cond) -> torch.Tensor:
    """L_fake = mean (σ⁻² + σ_d⁻²)·(μ_fake(sg(x) + σ·ε, σ) − sg(x))² (EDM weighting, DMD2's code)."""
    x = x.detach()
    pred = mu_fake(x + col(sigma, x) * torch.randn_like(x), sigma, **cond)
    return (col(sigma ** -2 + sigma_data ** -2, x) * (pred - x) ** 2).mean()


def real_score(teacher, cfg: DMSettings, guide=None, num_classes: int = 0):
    """μ_real: the teacher's denoiser, guided with weight `real_guidance` (cfg or autoguidance)."""
    D = teacher.denoiser()
    if cfg.real_guidance == 1.0:
        return D
    if cfg.guidance == "auto":
        return autoguided(D, guide.denoiser(), cfg.real_guidance)
    if num_classes == 0:
        raise ValueError("real_guidance with guidance 'cfg' needs a class-conditional teacher "
                         "(trained with label_dropout); use guidance 'auto' with a `guide` input")
    return cfg_guided(D, cfg.real_guidance, num_classes)


def generator_sigmas(noise, grid: int, steps: int) -> torch.Tensor:
    """The levels σ_0 = σ_max > … of a `steps`-step generator: the descending Karras grid of `grid`
    levels at indices k·grid/steps (DMD2's 4-step timesteps 999, 749, 499, 249 of 1000)."""
    desc = noise.karras_sigmas(grid)
    return desc[[round(k * grid / steps) for k in range(steps)]]


# ----------------------------------------------------------------------------- the method

class DistributionMatching(_Base):
    """Generator "net" (exported) and fake critic "critic", both from the teacher; μ_real; the DM
    and critic losses. DMD (`Method` below) and DMD2 (`methods/dmd2.py`) build on it."""

    resume = ("critic",)  # a stage warm-started from this model resumes its critic (DMD2's resume)
    roles = {
        "teacher": Role("model", method="edm", description="the EDM teacher: the real score μ_real"),
        "guide": Role("model", required=False, method="edm",
                      description="the weak guide of autoguidance (guidance: auto), e.g. a weak_snapshot stage"),
    }

    @classmethod
    def required_roles(cls, cfg) -> set[str]:
        return {"teacher"} | ({"guide"} if cfg.guidance == "auto" and cfg.real_guidance != 1.0 else set())

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs["teacher"]
        net_cfg = network_settings(ctx, teacher)
        self.add_net("net", net_cfg, init_from=teacher.nets["net"] if cfg.init_from_teacher else None)
        self.add_net("critic", teacher.meta_net_cfg("net"), init_from=teacher.nets["net"])
        self.G = EDMDenoiser(self.nets["net"], ctx.noise)
        self.mu_fake = EDMDenoiser(self.nets["critic"], ctx.noise)
        self.mu_real = real_score(teacher, cfg, ctx.inputs.get("guide"), ctx.data.num_classes)
        self.levels = karras_ascending(ctx.noise, cfg.grid).to(ctx.device)

    def groups(self) -> list[Group]:
        return [Group("net", list(self.nets["net"].parameters())),
                Group("critic", list(self.nets["critic"].parameters()), lr_scale=self.cfg.critic_lr_scale)]

    def one_step(self, z: torch.Tensor, **cond) -> torch.Tensor:
        """G_θ(z) = D_θ(σ_max·z, σ_max) for standard-normal z."""
        s = self.ctx.noise.sigma_max
        return self.G(s * z, torch.full((z.shape[0],), s, device=z.device), **cond)

    def dm_term(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, dict]:
        """L_DM on generator samples x (which carry the generator's graph)."""
        sigma = self.levels[dm_levels(x.shape[0], self.cfg.grid, self.cfg.dm_range, x.device)]
        x_t = x.detach() + col(sigma, x) * torch.randn_like(x)
        g = dm_gradient(x.detach(), x_t, sigma, self.mu_real, self.mu_fake, **cond)
        return dm_loss(x, g), {"dm_grad_norm": g.flatten(1).norm(dim=1).mean()}

    def critic_term(self, x: torch.Tensor, **cond) -> torch.Tensor:
        """L_fake on stop-grad samples x, σ uniform over the full grid."""
        sigma = self.levels[torch.randint(self.cfg.grid, (x.shape[0],), device=x.device)]
        return critic_loss(self.mu_fake, x, sigma, self.ctx.noise.sigma_data, **cond)


class Method(DistributionMatching):
    roles = {**DistributionMatching.roles,
             "pairs": Role("pairs", required=False,
                           description="the teacher's ODE couplings (an ode_pairs stage) of the regression loss")}

    @classmethod
    def required_roles(cls, cfg: Config) -> set[str]:
        return super().required_roles(cfg) | ({"pairs"} if cfg.reg_weight > 0 else set())

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        self.pairs = ctx.inputs.get("pairs") if cfg.reg_weight > 0 else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The pairs (z, y, label) with regression; else the data (only its labels are used)."""
        if self.pairs is None:
            return super().tensors()
        d = {"z": self.pairs["noise"].float(), "x_pair": self.pairs["sample"].float()}
        if self.ctx.data.num_classes > 0:
            d["y"] = self.pairs["label"].long()
        return d

    def loss(self, group, batch, step):
        y = self.labels(batch)
        cond = condition(y)
        n = next(iter(batch.values())).shape[0]
        shape = self.ctx.data.shape
        z = torch.randn((n, *shape), device=self.ctx.device)
        if group == "critic":
            with torch.no_grad():
                x = self.one_step(z, **cond)
            return self.critic_term(x, **cond), {}
        x = self.one_step(z, **cond)
        loss, logs = self.dm_term(x, **cond)
        if self.pairs is not None:
            l_reg = distance(self.one_step(batch["z"], **cond), batch["x_pair"], self.cfg.metric).mean()
            loss = loss + self.cfg.reg_weight * l_reg
            logs["reg"] = l_reg.detach()
        return loss, logs


def sample(model, z, nfe, class_labels=None):
    """x = σ_0·z, x̂ = D(x, σ_0); then x = x̂ + σ_k·ε, x̂ = D(x, σ_k) at the generator's levels."""
    D = EDMDenoiser(model.nets["net"], model.noise)
    sigmas = generator_sigmas(model.noise, model.cfg.grid, nfe).tolist()
    return cm_multistep(D, z, sigmas, 0.0, **condition(class_labels))
