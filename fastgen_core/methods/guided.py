"""Guided distillation, stage 1: a w-conditioned student (Meng et al. 2023, "On Distillation of Guided
Diffusion Models", §3.1; docs/methods.md §9).

A class-conditional teacher trained with label dropout has a conditional and an unconditional
x-prediction; classifier-free guidance at strength w combines them (Eq. 2 of the paper, w = 0 is
the conditional model unguided):

    x̂^w(z_t) = (1 + w)·x̂_c(z_t) − w·x̂_∅(z_t)

Stage 1 trains ONE student x̂_η(z_t, t, c, w), w entering through an embedding added to the time
embedding (`NetworkConfig.scalar_cond`), to regress x̂^w at every t:

    w ~ U[w_min, w_max],  t ~ U[0, 1],  z_t = α_t·x + β_t·ε,
    L = max(1, α_t²/β_t²)·‖x̂_η(z_t, t, c, w) − sg x̂^w(z_t)‖²      ("SNR-truncated", as stage 2)

so that one network evaluation replaces CFG's two. The student starts from the teacher's weights,
with the w-embedding's projection zeroed: at initialisation it is the conditional teacher for
every w (the guided prediction at w = 0).

Time convention (docs/methods.md §0): the VP / α-σ process `vp_cosine`, x_t = α_t·x0 + β_t·ε
(the progressive-distillation papers write σ_t for our β_t). Every model here is an EDM
x0-predictor D(x, σ) (the teacher's own preconditioning, σ_d from the teacher) read in VP time by
the one conversion of `noise.Process.from_edm_denoiser`: x̂(z_t, t) = D(z_t/α_t, σ(t)), σ = β/α.
So an EDM teacher, a w-student and a progressive round's student are queried alike.

Sampling: DDIM in x-prediction form on the process grid t_i = 1 − i/N (progressive distillation's
`ddim_step`): ε̂ = (z_t − α_t·x̂)/β_t, z_s = α_s·x̂ + β_s·ε̂, the last step returning x̂; starting
from z_1 = β_1·z. The guidance strength of a w-conditioned model is its `w_sample` setting unless
the caller passes `w` (e.g. the evaluate stage's `guidance` rows of kind `w`).
"""
from __future__ import annotations

import warnings
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from ..config import FieldError, Strict
from ..noise import EDM, EDMDenoiser
from .base import Method as _Base
from .base import Role
from .common import col, condition, network_settings, per_sample

W_MODELS = ("guided", "progressive")  # methods whose saved models may take a guidance strength w


class Config(Strict):
    name: Literal["guided"] = "guided"
    w_min: float = Field(0.0, ge=0, description="smallest guidance strength w of training (w = 0: unguided)")
    w_max: float = Field(4.0, ge=0, description="largest guidance strength w of training (paper: about 4 for pixels)")
    w_sample: float = Field(1.0, ge=0, description="w used when the model is sampled without one (evaluate's model rows)")
    init_from_teacher: bool = Field(True, description="start from the teacher's weights (w-embedding zeroed)")

    @model_validator(mode="after")
    def _w_range(self):
        if self.w_min > self.w_max:
            raise FieldError("w_max", f"w_max ({self.w_max}) must be at least w_min ({self.w_min})")
        return self


# ----------------------------------------------------------------------------- the guided target

def guided_x(x_cond: torch.Tensor, x_uncond: torch.Tensor, w) -> torch.Tensor:
    """x̂^w = (1 + w)·x̂_c − w·x̂_∅ (Eq. 2 of Meng et al.; w scalar or per-sample (N,))."""
    w = per_sample(w, x_cond)
    return col(1 + w, x_cond) * x_cond - col(w, x_cond) * x_uncond


def sample_w(n: int, w_min: float, w_max: float, device=None) -> torch.Tensor:
    """w ~ U[w_min, w_max], one per sample."""
    return w_min + (w_max - w_min) * torch.rand(n, device=device)


def snr_trunc_weight(process, t: torch.Tensor) -> torch.Tensor:
    """max(1, SNR(t)), SNR = α_t²/β_t² = 1/σ(t)²: x-MSE times it is progressive distillation's
    `snr_trunc` loss max(x-MSE, ε-MSE) (the ε error is α_t/β_t times the x error)."""
    _, sigma = process.to_edm(t)
    return torch.clamp(1 / sigma**2, min=1.0)


# ----------------------------------------------------------------------------- models in VP time

def edm_denoiser(model) -> Callable:
    """The EDM x0-predictor D(x, σ, **cond) of a loaded model: an EDM teacher's own, or that of a
    guided/progressive model (its network under EDM preconditioning with the σ_d it recorded)."""
    if model.meta["method"] == "edm":
        return model.denoiser()
    return EDMDenoiser(model.nets["net"], EDM(sigma_data=model.meta["sigma_data"]))


def takes_w(model) -> bool:
    """Whether a loaded model's network takes the guidance strength w."""
    return bool(model.meta_net_cfg("net").scalar_cond)


def ddim_step(D: Callable, process, z: torch.Tensor, t, s, last: bool = False, **cond) -> torch.Tensor:
    """One DDIM step t → s of an x0-predictor D(z_t, t) in α-σ form (progressive distillation's
    `ddim_step`): x̂ = D(z_t, t), ε̂ = (z_t − α_t·x̂)/β_t, z_s = α_s·x̂ + β_s·ε̂; `last`: return x̂."""
    t, s = per_sample(t, z), per_sample(s, z)
    x_hat = D(z, t, **cond)
    if last:
        return x_hat
    (a_t, b_t), (a_s, b_s) = process.alpha_beta(t), process.alpha_beta(s)
    eps_hat = (z - col(a_t, z) * x_hat) / col(b_t, z)
    return col(a_s, z) * x_hat + col(b_s, z) * eps_hat


@torch.no_grad()
def ddim_sample(D: Callable, process, z: torch.Tensor, N: int, **cond) -> torch.Tensor:
    """N DDIM steps down the process grid (t_i = 1 − i/N for vp_cosine) from z_1 = β_1·z; the last
    step returns the x-prediction (N network evaluations)."""
    grid = process.grid(N).tolist()
    x = col(process.alpha_beta(torch.tensor(grid[:1], dtype=z.dtype, device=z.device))[1], z) * z
    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        x = ddim_step(D, process, x, t, s, last=i == N - 1, **cond)
    return x


def w_condition(model, z: torch.Tensor, class_labels, w) -> dict:
    """The keyword conditions of a sampling call: the labels, and w for a w-conditioned model
    (`w` None: the model's `w_sample`)."""
    cond = condition(class_labels)
    if takes_w(model):
        cond["w"] = per_sample(model.cfg.w_sample if w is None else w, z)
    elif w is not None:
        raise ValueError(f"a {model.meta['method']} model without a w-embedding cannot be sampled at w = {w}")
    return cond


def add_student(method, teacher, scalar_cond: bool, init: bool) -> None:
    """Own "net": the teacher's network settings (or the stage's), with a w-embedding when
    `scalar_cond`; optionally the teacher's weights, a new w-embedding's projection zeroed (so w
    has no effect at the start)."""
    net_cfg = network_settings(method.ctx, teacher).model_copy(update={"scalar_cond": scalar_cond})
    net = method.add_net("net", net_cfg)
    if not init:
        return
    missing, unexpected = net.load_state_dict(teacher.nets["net"].state_dict(), strict=False)
    if unexpected or any(not k.startswith(("embed.map_w", "embed.fourier_w")) for k in missing):
        raise ValueError(f"teacher and student networks differ: missing {missing}, unexpected {unexpected}")
    if missing:
        with torch.no_grad():
            net.embed.map_w.weight.zero_()
            net.embed.map_w.bias.zero_()


def sigma_data_of(teacher) -> float:
    """The σ_d of a teacher's EDM preconditioning (recorded by every guided/progressive model)."""
    return teacher.meta["sigma_data"] if "sigma_data" in teacher.meta else teacher.noise.sigma_data


# ----------------------------------------------------------------------------- the method

class Method(_Base):
    roles = {"teacher": Role("model", method="edm", unconditional=True,
                             description="the class-conditional EDM teacher trained with label_dropout > 0")}
    processes = ("vp_cosine",)

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs["teacher"]
        if ctx.data.num_classes == 0:
            raise ValueError("guided distillation needs class-conditional data (data.conditional: true)")
        if not getattr(teacher.cfg, "label_dropout", 0):  # its null-label prediction was never trained
            warnings.warn("guided: the teacher has no unconditional mode (train it with method.label_dropout > 0): "
                          "its x̂_∅, and so the guided target, is untrained", stacklevel=2)
        self.sigma_data = sigma_data_of(teacher)
        add_student(self, teacher, scalar_cond=True, init=cfg.init_from_teacher)
        P = ctx.noise
        self.x_teacher = P.from_edm_denoiser(edm_denoiser(teacher))
        self.x_student = P.from_edm_denoiser(EDMDenoiser(self.nets["net"], EDM(sigma_data=self.sigma_data)))

    def target(self, z_t, t, y, w) -> torch.Tensor:
        """The teacher's guided x-prediction x̂^w(z_t) = (1 + w)·x̂_c − w·x̂_∅ (∅: the null label)."""
        with torch.no_grad():
            x_c = self.x_teacher(z_t, t, class_labels=y)
            x_u = self.x_teacher(z_t, t, class_labels=torch.full_like(y, self.ctx.data.num_classes))
        return guided_x(x_c, x_u, w)

    def loss(self, group, batch, step):
        x0, y, P = batch["x"], batch["y"], self.ctx.noise
        n = x0.shape[0]
        t = P.sample_t(n, device=x0.device)
        w = sample_w(n, self.cfg.w_min, self.cfg.w_max, x0.device)
        z_t = P.forward(x0, t, torch.randn_like(x0))
        x_hat = self.x_student(z_t, t, class_labels=y, w=w)
        mse = ((x_hat - self.target(z_t, t, y, w)) ** 2).flatten(1).mean(1)
        return (snr_trunc_weight(P, t).to(mse) * mse).mean(), {"x_mse": mse.mean().detach()}

    def meta(self) -> dict:
        return {"sigma_data": self.sigma_data}


def sample(model, z, nfe, class_labels=None, w=None):
    """`nfe` DDIM steps of the w-student at guidance strength w (None: its `w_sample`)."""
    D = model.noise.from_edm_denoiser(edm_denoiser(model))
    return ddim_sample(D, model.noise, z, nfe, **w_condition(model, z, class_labels, w))
