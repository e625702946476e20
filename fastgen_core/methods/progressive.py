"""Progressive distillation rounds (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling
of Diffusion Models", Alg. 2), stage 2 of guided distillation (Meng et al. 2023, §3.2;
docs/methods.md §9). Follows google-research `diffusion_distillation` (`dpm.py`, `training_losses`).

One round distils the teacher's 2N-step DDIM sampler into an N-step student, on the VP / α-σ
process `vp_cosine` (x_t = α_t·x + β_t·ε; the papers write σ_t for β_t). The student starts from
the round's teacher. With i ~ U{0..N−1}, t = (i + 1)/N, t' = t − 0.5/N, s = t − 1/N:

    z_t = α_t·x + β_t·ε
    two teacher DDIM steps   z_t' = α_t'·x̂_T(z_t) + β_t'·ε̂_T(z_t),  z̃_s = α_s·x̂_T(z_t') + β_s·ε̂_T(z_t')
    x-space target           x̃ = (z̃_s − (β_s/β_t)·z_t) / (α_s − (β_s/β_t)·α_t)
                             (i = 0, the step to data: x̃ = x̂_T(z_t'), the teacher's last step)
    loss ("snr_trunc")       max(‖x̂_η(z_t) − x̃‖², ‖ε̂_η(z_t) − ε̃‖²) = max(1, α_t²/β_t²)·‖x̂_η(z_t) − x̃‖²

x̃ is the x-prediction with which ONE student DDIM step t → s lands where the teacher's two land:
α_s·x̃ + β_s·(z_t − α_t·x̃)/β_t = z̃_s. ε̂ = (z_t − α_t·x̂)/β_t throughout.

Guidance (Meng et al. stage 2): when the teacher takes a guidance strength w (a `guided` student or
an earlier w-conditioned round), the student does too, and each sample's w ~ U[w_min, w_max] goes
to teacher and student alike. An EDM teacher (no w) gives plain progressive distillation.

The models are EDM x0-predictors read in VP time (`guided.edm_denoiser`, `Process.from_edm_denoiser`),
sampled with N DDIM steps (`guided.ddim_sample`). The paper's schedule (Adam, no warmup, lr annealed
linearly to 0 within a round, no EMA, 8192 → 1 steps on CIFAR) maps to the stage's `train`; the
anneal is the loop's `lr_schedule: linear_decay`, which a `progressive` group sets for its rounds
unless told otherwise (docs/methods.md §9).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import FieldError, Strict
from ..noise import EDM, EDMDenoiser
from . import guided
from .base import Method as _Base
from .base import Role
from .common import col, condition, per_sample

TEACHERS = ("edm", "guided", "progressive")


class Config(Strict):
    name: Literal["progressive"] = "progressive"
    N: int = Field(1, ge=1, description="the student's number of DDIM steps (the teacher takes 2N); a progressive "
                   "group sets it per round")
    w_min: float = Field(0.0, ge=0, description="w-conditioned teacher: smallest guidance strength w of training")
    w_max: float = Field(4.0, ge=0, description="w-conditioned teacher: largest guidance strength w of training")
    w_sample: float = Field(1.0, ge=0, description="w used when the model is sampled without one (evaluate's model rows)")

    @model_validator(mode="after")
    def _w_range(self):
        if self.w_min > self.w_max:
            raise FieldError("w_max", f"w_max ({self.w_max}) must be at least w_min ({self.w_min})")
        return self


def round_times(i: torch.Tensor, N: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t = (i + 1)/N, t' = t − 0.5/N, s = t − 1/N: the student's step t → s, the teacher's midpoint t'."""
    t = (i + 1).to(dtype) / N
    return t, t - 0.5 / N, t - 1.0 / N


def x_target(process, z_t: torch.Tensor, t, s, z_s: torch.Tensor) -> torch.Tensor:
    """x̃ = (z̃_s − (β_s/β_t)·z_t)/(α_s − (β_s/β_t)·α_t): the x-prediction whose DDIM step t → s
    from z_t reaches the teacher's z̃_s."""
    (a_t, b_t), (a_s, b_s) = process.alpha_beta(per_sample(t, z_t)), process.alpha_beta(per_sample(s, z_t))
    r = b_s / b_t
    return (z_s - col(r, z_t) * z_t) / col(a_s - r * a_t, z_t)


def teacher_target(D_teacher, process, z_t: torch.Tensor, i: torch.Tensor, N: int, **cond) -> torch.Tensor:
    """The round's target x̃ at z_t: two teacher DDIM steps t → t' → s, then `x_target`; at i = 0 the
    teacher's x-prediction at t' (its last step)."""
    t, t_mid, s = round_times(i, N, z_t.dtype)
    z_mid = guided.ddim_step(D_teacher, process, z_t, t, t_mid, **cond)
    x_mid = D_teacher(z_mid, t_mid, **cond)
    (a_m, b_m), (a_s, b_s) = process.alpha_beta(t_mid), process.alpha_beta(s)
    z_s = col(a_s, z_t) * x_mid + col(b_s, z_t) * (z_mid - col(a_m, z_t) * x_mid) / col(b_m, z_t)
    return torch.where(col(i == 0, z_t), x_mid, x_target(process, z_t, t, s, z_s))


class Method(_Base):
    roles = {"teacher": Role("model", description="the round's teacher: an edm teacher, a guided w-student or "
                             "the previous round's student")}
    processes = ("vp_cosine",)

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs["teacher"]
        made = teacher.meta.get("method")
        if made not in TEACHERS:
            raise ValueError(f"inputs: teacher: progressive distillation needs a model trained with "
                             f"{', '.join(TEACHERS)}, got {made!r}")
        self.sigma_data = guided.sigma_data_of(teacher)
        self.w_cond = made != "edm" and guided.takes_w(teacher)
        guided.add_student(self, teacher, scalar_cond=self.w_cond, init=True)
        P = ctx.noise
        self.x_teacher = P.from_edm_denoiser(guided.edm_denoiser(teacher))
        self.x_student = P.from_edm_denoiser(EDMDenoiser(self.nets["net"], EDM(sigma_data=self.sigma_data)))

    def condition(self, batch: dict, n: int, device) -> dict:
        """The labels (if any) and, for a w-conditioned round, w ~ U[w_min, w_max] per sample."""
        cond = condition(batch.get("y"))
        if self.w_cond:
            cond["w"] = guided.sample_w(n, self.cfg.w_min, self.cfg.w_max, device)
        return cond

    def loss(self, group, batch, step):
        x0, P, N = batch["x"], self.ctx.noise, self.cfg.N
        n = x0.shape[0]
        i = torch.randint(N, (n,), device=x0.device)
        t = round_times(i, N)[0]
        cond = self.condition(batch, n, x0.device)
        z_t = P.forward(x0, t, torch.randn_like(x0))
        with torch.no_grad():
            target = teacher_target(self.x_teacher, P, z_t, i, N, **cond)
        mse = ((self.x_student(z_t, t, **cond) - target) ** 2).flatten(1).mean(1)
        return (guided.snr_trunc_weight(P, t).to(mse) * mse).mean(), {"x_mse": mse.mean().detach()}

    def meta(self) -> dict:
        return {"sigma_data": self.sigma_data, "N": self.cfg.N}


def sample(model, z, nfe, class_labels=None, w=None):
    """`nfe` DDIM steps (a round's student is trained for its N = `model.meta["N"]`), at guidance
    strength w for a w-conditioned model (None: its `w_sample`)."""
    D = model.noise.from_edm_denoiser(guided.edm_denoiser(model))
    return guided.ddim_sample(D, model.noise, z, nfe, **guided.w_condition(model, z, class_labels, w))
