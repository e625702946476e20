"""Constant Acceleration Flow (Park et al. 2024, "Constant Acceleration Flow"; docs/methods.md §2).
Process `caf` (§0): t = 0 is the standard-normal noise x0, t = 1 the data x1.

A coupling (x0, x1) is joined by a path of constant acceleration a with initial velocity v0:

    x_t = (1 − t²)·x0 + t²·x1 + v0·(t − t²)
    v0  = h·(x1 − x0),   a = 2·(x1 − x0) − 2·v0   (h = 1.5)

so that x_t = x0 + v0·t + a·t²/2 and dx_t/dt = v0 + a·t. Two networks of one architecture, both
fed concat(x_t, v0) (`cond` channels of `nets`), trained in two stages on the same couplings:

- `part: velocity`: v_θ(x_t, t) regresses v0 = h·(x1 − x0) on x_t built with the true v0; its v0
  input is zeros; t uniform on {0, 1/1000, …, 1} (`noise.CAF.sample_t`). Sampling uses v_θ(x0, 0),
  inversion v_θ(x1, 1).
- `part: acceleration` (initial-velocity conditioning, input `velocity`: a trained velocity
  stage): v̂ = stopgrad v_θ(x0, 0), x_t rebuilt with v̂, a_φ(x_t, t, v̂) regresses 2(x1 − x0) − 2v̂.
  The model it saves holds both networks ("vel", "acc"), so it samples alone.

- `gan: {…}` (CAF's optional GAN stage, scripts/caf_train_gan.py; part: acceleration, input
  `acceleration`: a trained acceleration stage): both networks copied from that stage, v_θ frozen,
  a_φ finetuned on L_rec + λ·L_G. L_rec is the acceleration loss above on the couplings (t on
  {0, 1/K, …, 1}, K = `t_levels`, CAF's GAN code: 10); L_G the hinge generator loss of the 1-step
  sample x̂ = x0 + v̂ + ½·a_φ(x0, 0, v̂) of the coupling's noise; λ = clip(‖∇_W 2·L_rec‖ /
  (‖∇_W L_G‖ + 10⁻⁴), 0.01, 10) on a_φ's output layer W (`gan.adaptive_weight` on 2·L_rec). An
  unconditional discriminator "disc" sees the data set's points (real) against detached x̂ (fake)
  with the hinge loss; generator and discriminator alternate (a_φ on steps ≡ 0 mod g_every, the
  discriminator on the others: `Group.skip_every`), as CAF's loop does.

Couplings: the `pairs` of an ode_pairs stage (reflow), or `couplings: independent` (x0 ~ N(0, I)
drawn per batch against data: the paper's no-reflow ablation). With `noise: {process: caf, source: NAME}`
x0 is drawn from a 2D toy mixture instead (mixture → mixture, `noise.CAF`; its pairs must come from a
teacher of the same source, checked at recipe load). An EDM teacher's pair is already in
CAF's convention (`coupling`). Losses: l2, or CAF's pseudo-Huber (`pseudo_huber`).

Sampler (N steps, Δt = ±1/N): v̂ once, then x ← x + v̂·Δt + (t_i + Δt/2)·a(x, t_i, v̂)·Δt,
exact for a constant a whatever N (and whatever the steps: `trajectory` takes them equal in κ);
clamp to the data range at the end (`clamp`). Forward from
t = 0 costs N + 1 evaluations, so an NFE budget of n ≥ 2 runs N = n − 1 steps; at n = 1 the model
answers with its velocity alone (below). Inversion: the same steps from t = 1 backwards, v̂ = v_θ(x1, 1);
reconstruction (`reconstruct`, CAF's code) samples the inverted noise with that same v̂.
A velocity-only model (or any model at 1 NFE) follows the flow of the marginal with the true v0,
dx_t/dt = κ'(t)·v_θ(x_t, t)/h (κ = t² + h(t − t²), §0), by Euler steps in κ:
x ← x + (κ(t_{i+1}) − κ(t_i))·v_θ(x, t_i)/h; one step is the public code's x1 = x0 + v_θ(x0, 0)/h.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from ..config import FieldError, Strict
from ..gan import Adversary, Discriminator, GANConfig, gan_term
from ..noise import CAF
from .base import Group, Role
from .base import Method as _Base
from .common import col, condition, network_settings, per_sample
from .rf import pairs_digest

Tensor = torch.Tensor


class GANSettings(GANConfig):
    """The GAN stage's settings: `gan.GANConfig` with CAF's code's defaults (scripts/caf_train_gan.py)."""

    g_every: int = Field(2, ge=2, description="the generator steps on iterations ≡ 0 mod g_every, the discriminator on "
                         "the others (CAF's code: 2; they alternate, so at least 2)")
    lr_scale: float = Field(50.0, gt=0, description="discriminator lr = lr_scale × the stage's lr (CAF's code: "
                            "1e-3 against the generator's 2e-5)")


class Config(Strict):
    """CAF's settings (docs/methods.md §2); h is the `caf` noise process's setting."""

    name: Literal["caf"] = "caf"
    part: Literal["velocity", "acceleration"] = Field(
        "velocity", description="velocity: train v_θ (stage 1); acceleration: train a_φ conditioned on the "
        "`velocity` input's v̂ (stage 2; its model holds both networks)")
    couplings: Literal["pairs", "independent"] = Field(
        "pairs", description="pairs: the `pairs` input's teacher couplings (reflow); independent: fresh "
        "noise against data (the no-reflow ablation)")
    loss: Literal["l2", "pseudo_huber"] = Field(
        "l2", description="l2, or CAF's pseudo-Huber (√(‖Δ‖² + c²) − c)/d, c = 0.00054·d")
    clamp: float | None = Field(None, gt=0, description="sampling clamps the result to [−clamp, clamp] "
                                "(1 for images in [−1, 1]; None: no clamp)")
    t_levels: int = Field(1000, ge=1, description="training times t uniform on {0, 1/K, …, 1}, K = t_levels "
                          "(CAF's code: 1000; its GAN stage: 10)")
    gan: GANSettings | None = Field(None, description="CAF's GAN stage (part: acceleration, input `acceleration`): "
                                    "finetune the acceleration on its loss + λ·hinge L_G of 1-step samples against "
                                    "the data (discriminator 'disc'); None: no GAN")

    omit_at_default = {"t_levels": 1000, "gan": None}  # (Strict) stages that leave them unset keep their digests

    @model_validator(mode="after")
    def _gan_fits_caf(self):
        if self.gan is not None and self.part != "acceleration":
            raise FieldError("gan", "CAF's GAN stage finetunes the acceleration: needs part: acceleration")
        if self.gan is not None and self.gan.noised:
            raise FieldError("gan.noised", "CAF's discriminator sees clean samples (no EDM noising)")
        return self


# ----------------------------------------------------------------------------- the path (docs/methods.md §2)

def initial_velocity(x0: Tensor, x1: Tensor, h: float) -> Tensor:
    """v0 = h·(x1 − x0)."""
    return h * (x1 - x0)


def acceleration(x0: Tensor, x1: Tensor, v0: Tensor) -> Tensor:
    """a = 2·(x1 − x0) − 2·v0: the constant acceleration that reaches x1 at t = 1 from x0 with v0."""
    return 2 * (x1 - x0) - 2 * v0


def interpolant(x0: Tensor, x1: Tensor, v0: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t²)·x0 + t²·x1 + v0·(t − t²), t per sample."""
    t = col(t, x0)
    return (1 - t * t) * x0 + t * t * x1 + v0 * (t - t * t)


def coupling(pairs: dict) -> tuple[Tensor, Tensor]:
    """An ode_pairs set as CAF couplings (x0 noise at t = 0, x1 data at t = 1). The one conversion
    of an EDM teacher's couplings: the pair's `noise` z is standard normal (the teacher starts at
    σ_max·z, i.e. x_σ/σ at its largest level), which is CAF's t = 0 state ε (α(0) = 0, β(0) = 1 in
    `noise.CAF`); its `sample` is the teacher's data x1. So x0 = z, x1 = sample, unscaled."""
    return pairs["noise"].float(), pairs["sample"].float()


def pseudo_huber(pred: Tensor, target: Tensor) -> Tensor:
    """CAF's per-sample pseudo-Huber (√(‖Δ‖² + c²) − c)/d with c = 0.00054·d, d the dimension
    (docs/methods.md §2; note c scales with d here, not with √d as in the consistency models)."""
    diff = (pred - target).flatten(1)
    d = diff.shape[1]
    c = 0.00054 * d
    return ((diff**2).sum(1) + c**2).sqrt().sub(c) / d


def one_step(acc: Callable, x0: Tensor, v_hat: Tensor, **cond) -> Tensor:
    """CAF's 1-step estimate x̂ = x0 + v̂ + ½·a(x0, 0, v̂) (the GAN stage's fake; `caf_path` with N = 1,
    which samples without gradients)."""
    return x0 + v_hat + 0.5 * acc(x0, 0.0, v_hat, **cond)


def caf_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean over the batch of the per-sample l2 (mean squared error) or CAF's pseudo-Huber."""
    if kind == "l2":
        return ((pred - target) ** 2).flatten(1).mean(1).mean()
    return pseudo_huber(pred, target).mean()


# ----------------------------------------------------------------------------- networks

def net_settings(net_cfg, shape):
    """A network's settings with the v0 input channels (concat(x_t, v0)): cond_channels = C."""
    return net_cfg.model_copy(update={"cond_channels": int(shape[0])})


def velocity_fn(net) -> Callable:
    """v_θ(x_t, t): the velocity network with its v0 input left at zeros (as CAF's code does)."""
    return lambda x, t, **cond: net(x, per_sample(t, x), **cond)


def acceleration_fn(net) -> Callable:
    """a_φ(x_t, t, v0): the acceleration network fed concat(x_t, v0)."""
    return lambda x, t, v, **cond: net(x, per_sample(t, x), cond=v, **cond)


# ----------------------------------------------------------------------------- samplers

@torch.no_grad()
def caf_path(vel: Callable, acc: Callable, x: Tensor, times: list[float], v: Tensor | None = None,
             **cond) -> Tensor:
    """CAF's sampler over `times` t_0, …, t_N (increasing: sampling from t_0 = 0; decreasing:
    inversion from t_0 = 1), every state: v̂ = v(x, t_0) once (or the given `v`), then with
    Δt = t_{i+1} − t_i x ← x + v̂·Δt + (t_i + Δt/2)·a(x, t_i, v̂)·Δt, the exact increment of
    x_t = x0 + v̂·t + a·t²/2 for a constant a (x_{t+Δt} − x_t = v̂·Δt + a·((t + Δt)² − t²)/2)
    whatever the steps. Returns (N + 1, *x.shape)."""
    v = vel(x, times[0], **cond) if v is None else v
    xs = [x]
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        xs.append(xs[-1] + v * dt + (t + dt / 2) * acc(xs[-1], t, v, **cond) * dt)
    return torch.stack(xs)


@torch.no_grad()
def velocity_path(vel: Callable, P: CAF, x: Tensor, times: list[float], **cond) -> Tensor:
    """Euler in κ on the marginal flow of the true-v0 path, dx_t/dt = κ'(t)·v(x_t, t)/h, over `times`:
    x ← x + (κ(t_{i+1}) − κ(t_i))·v(x, t_i)/h. Returns (N + 1, *x.shape)."""
    k = P.kappa(torch.tensor(times, dtype=torch.float64)).tolist()
    xs = [x]
    for i, t in enumerate(times[:-1]):
        xs.append(xs[-1] + (k[i + 1] - k[i]) / P.h * vel(xs[-1], t, **cond))
    return torch.stack(xs)


def kappa_times(P: CAF, N: int) -> list[float]:
    """Times with κ(t_i) = i/N: on them a path of the true v0, x_t = x0 + κ(t)·(x1 − x0), moves by
    equal steps (`trajectory`)."""
    return P.t_of_kappa(torch.arange(N + 1, dtype=torch.float64) / N).tolist()


def _path(model, x: Tensor, times: list[float], use_acc: bool, class_labels) -> Tensor:
    cond, vel = condition(class_labels), velocity_fn(model.nets["vel"])
    if use_acc and "acc" in model.nets:
        return caf_path(vel, acceleration_fn(model.nets["acc"]), x, times, **cond)
    return velocity_path(vel, model.noise, x, times, **cond)


def _steps(model, nfe: int) -> tuple[int, bool]:
    """(steps N, use the acceleration) for an NFE budget: a two-network model runs N = nfe − 1 CAF
    steps from 2 NFE and its velocity alone at 1 NFE; a velocity-only model N = nfe Euler steps."""
    if nfe < 1:
        raise ValueError(f"nfe must be ≥ 1, got {nfe}")
    if "acc" in model.nets and nfe >= 2:
        return nfe - 1, True
    return (nfe if "acc" not in model.nets else 1), False


def sample(model, z, nfe, class_labels=None):
    """Noise z (standard normal, t = 0) → data with `nfe` evaluations on t_i = i/N (`_steps`), clamped
    to [−clamp, clamp] when the method's `clamp` is set."""
    N, use_acc = _steps(model, nfe)
    x = _path(model, z, model.noise.grid(N).tolist(), use_acc, class_labels)[-1]
    clamp = model.cfg.clamp
    return x if clamp is None else x.clamp(-clamp, clamp)


def invert(model, x, nfe, class_labels=None) -> Tensor:
    """Data x (t = 1) → noise (t = 0): the sampler run backwards with the same budget, v̂ = v_θ(x, 1)."""
    N, use_acc = _steps(model, nfe)
    return _path(model, x, model.noise.grid(N).tolist()[::-1], use_acc, class_labels)[-1]


@torch.no_grad()
def reconstruct(model, x, nfe, class_labels=None) -> Tensor:
    """G(G⁻¹(x)) as CAF's code measures reconstruction (docs/methods.md §2): invert x with
    v̂ = v_θ(x, 1), then sample from the inverted noise with that same v̂ (CAF's latent of x is the
    pair (z, v̂); a fresh v_θ(z, 0) would add the velocity model's error v_θ(z, 0) − v_θ(x, 1)).
    N = nfe − 1 steps each way; 1 + 2N evaluations. A velocity-only answer (one network, or 1 NFE)
    evaluates v at every step and has no v̂ to keep: `sample(invert(x))`."""
    N, use_acc = _steps(model, nfe)
    if not use_acc:
        return sample(model, invert(model, x, nfe, class_labels), nfe, class_labels)
    cond, grid = condition(class_labels), model.noise.grid(N).tolist()
    vel, acc = velocity_fn(model.nets["vel"]), acceleration_fn(model.nets["acc"])
    v_hat = vel(x, grid[-1], **cond)
    z = caf_path(vel, acc, x, grid[::-1], v=v_hat, **cond)[-1]
    out = caf_path(vel, acc, z, grid, v=v_hat, **cond)[-1]
    clamp = model.cfg.clamp
    return out if clamp is None else out.clamp(-clamp, clamp)


def trajectory(model, z, nfe, class_labels=None) -> Tensor:
    """States of the N = nfe step sampler from z, shape (nfe + 1, n, ...), at the times where
    κ(t_i) = i/N (`kappa_times`; the CAF step is exact for a constant acceleration on any steps).
    So rectified flow's straightness (uniform steps) measures how far the paths are from straight
    lines, not CAF's designed speed profile: an exact CAF path, x_t = x0 + κ(t)·(x1 − x0), has
    straightness 0 on these states but (1 − h)²/3·E‖x1 − x0‖² on t_i = i/N.
    A two-network model spends nfe + 1 evaluations."""
    return _path(model, z, kappa_times(model.noise, nfe), True, class_labels)


# ----------------------------------------------------------------------------- training

class Method(_Base):
    roles = {
        "pairs": Role("pairs", required=False,
                      description="teacher couplings (noise, sample, label) of an ode_pairs stage (couplings: pairs)"),
        "velocity": Role("model", required=False, method="caf",
                         description="the trained velocity stage whose v̂ conditions the acceleration (part: acceleration)"),
        "acceleration": Role("model", required=False, method="caf",
                             description="the trained acceleration stage that the GAN stage (`gan`) finetunes"),
    }
    processes = ("caf",)

    @classmethod
    def required_roles(cls, cfg: Config) -> set[str]:
        return ({"pairs"} if cfg.couplings == "pairs" else set()) | (
            {"velocity"} if cfg.part == "acceleration" and cfg.gan is None else set()) | (
            {"acceleration"} if cfg.gan is not None else set())

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        if not isinstance(ctx.noise, CAF):
            raise ValueError(f"noise.process: method 'caf' trains in the caf process, not {ctx.noise.process!r}")
        self.P, shape = ctx.noise, ctx.data.shape
        self.pairs = ctx.inputs.get("pairs") if cfg.couplings == "pairs" else None
        if self.pairs is not None:
            self._check_pairs(self.pairs)
        self.adv = None
        if cfg.part == "velocity":
            self.export = ("vel",)
            self.add_net("vel", net_settings(network_settings(ctx), shape))
        elif cfg.gan is not None:
            self._finetune(ctx.inputs["acceleration"])
        else:
            velmodel = ctx.inputs["velocity"]
            if velmodel.noise != ctx.noise:
                raise ValueError(f"inputs.velocity: trained in process {velmodel.noise.model_dump()}, this stage "
                                 f"in {ctx.noise.model_dump()}: both stages need the same caf process (same h)")
            self.export = ("vel", "acc")
            vel = self.add_net("vel", velmodel.meta_net_cfg("vel"), init_from=velmodel.nets["vel"])
            vel.requires_grad_(False)
            own = ctx.network if ctx.network is not None else velmodel.meta_net_cfg("vel")
            self.add_net("acc", net_settings(own, shape))

    def _finetune(self, accmodel) -> None:
        """The GAN stage (CAF's caf_train_gan.py): v_θ and a_φ copied from a trained acceleration stage
        (its saved EMA weights), v_θ frozen; an unconditional discriminator "disc" (CAF's takes no
        class); the data set's points as the real samples."""
        if accmodel.noise != self.ctx.noise or "acc" not in accmodel.nets:
            raise ValueError(f"inputs.acceleration: needs a two-network caf model trained in this stage's process "
                             f"{self.ctx.noise.model_dump()} (got networks {sorted(accmodel.nets)}, process "
                             f"{accmodel.noise.model_dump()})")
        if self.ctx.network is not None and net_settings(self.ctx.network, self.ctx.data.shape) != accmodel.meta_net_cfg("acc"):
            raise ValueError("network: the GAN stage finetunes the `acceleration` input's networks; give its network")
        self.export = ("vel", "acc")
        self.add_net("vel", accmodel.meta_net_cfg("vel"), init_from=accmodel.nets["vel"]).requires_grad_(False)
        self.add_net("acc", accmodel.meta_net_cfg("acc"), init_from=accmodel.nets["acc"])
        g = self.cfg.gan
        D = Discriminator(self.ctx.data.shape, 0, g.width, g.depth).to(self.ctx.device)
        self.nets["disc"] = D
        self.adv = Adversary(g, D, self.ctx.noise)
        self.real = self.ctx.data.x.to(self.ctx.device)

    def _check_pairs(self, pairs: dict) -> None:
        x0, x1 = coupling(pairs)
        want = tuple(self.ctx.data.shape)
        if tuple(x0.shape[1:]) != want or x0.shape != x1.shape:
            raise ValueError(f"inputs.pairs: couplings of shape {tuple(x0.shape[1:])} → {tuple(x1.shape[1:])}, "
                             f"the data's is {want}")
        if self.ctx.data.num_classes > 0 and bool((pairs["label"] < 0).any()):
            raise ValueError("inputs.pairs: the pairs carry no class labels (an unconditional teacher) "
                             "but the data is class-conditional")

    def groups(self) -> list[Group]:
        """The trained network; in the GAN stage a_φ on steps ≡ 0 mod g_every and the discriminator
        (lr × lr_scale) on the others (CAF's loop steps one or the other each iteration)."""
        name = "vel" if self.cfg.part == "velocity" else "acc"
        if self.adv is None:
            return [Group(name, list(self.nets[name].parameters()))]
        g = self.cfg.gan
        return [Group("acc", list(self.nets["acc"].parameters()), every=g.g_every),
                Group("disc", list(self.nets["disc"].parameters()), lr_scale=g.lr_scale, skip_every=g.g_every)]

    def tensors(self) -> dict[str, Tensor]:
        if self.pairs is None:  # independent couplings: data here, noise drawn per batch
            return {("x1" if k == "x" else k): v for k, v in super().tensors().items()}
        x0, x1 = coupling(self.pairs)
        d = {"x0": x0, "x1": x1}
        if self.ctx.data.num_classes > 0:
            d["y"] = self.pairs["label"].long()
        return d

    def loss(self, group, batch, step):
        x1, cond = batch["x1"], condition(self.labels(batch))
        x0 = batch["x0"] if "x0" in batch else self.P.draw_like(x1)  # N(0, I), or the process's source
        if group == "disc":
            return self._discriminator_loss(x0, cond)
        t = self.P.sample_t(x1.shape[0], device=x1.device, levels=self.cfg.t_levels)
        if self.cfg.part == "velocity":
            v0 = initial_velocity(x0, x1, self.P.h)
            pred = velocity_fn(self.nets["vel"])(interpolant(x0, x1, v0, t), t, **cond)
            return caf_loss(pred, v0, self.cfg.loss), {}
        v_hat = self._v_hat(x0, cond)
        if self.adv is not None and self.cfg.clamp is not None:  # CAF's GAN loop clamps the couplings' data
            x1 = x1.clamp(-self.cfg.clamp, self.cfg.clamp)
        acc = acceleration_fn(self.nets["acc"])
        loss = caf_loss(acc(interpolant(x0, x1, v_hat, t), t, v_hat, **cond), acceleration(x0, x1, v_hat), self.cfg.loss)
        if self.adv is None or step < self.cfg.gan.start:
            return loss, {}
        fake = one_step(acc, x0, v_hat, **cond)
        l_gan, lam = gan_term(self.adv, self.cfg.gan, 2 * loss, fake, None, None, self.nets["acc"])
        return loss + lam * l_gan, {"caf": loss.detach(), "gan": l_gan.detach(), "gan_weight": lam}

    def _v_hat(self, x0: Tensor, cond: dict) -> Tensor:
        """v̂ = stopgrad v_θ(x0, 0) from the frozen velocity model in eval mode (no dropout)."""
        self.nets["vel"].eval()
        with torch.no_grad():
            return velocity_fn(self.nets["vel"])(x0, 0.0, **cond)

    def _discriminator_loss(self, x0: Tensor, cond: dict):
        """Hinge L_D: data points drawn at random (real; CAF's loader of the real data set, apart from the
        couplings) against the detached 1-step samples x̂ of the couplings' noise (fake)."""
        with torch.no_grad():
            fake = one_step(acceleration_fn(self.nets["acc"]), x0, self._v_hat(x0, cond), **cond)
        real = self.real[torch.randint(self.real.shape[0], (x0.shape[0],)).to(self.real.device)]
        return self.adv.discriminator_loss(real, fake)

    def meta(self) -> dict:
        """Which couplings the model was trained on (the pair set's digest, as rf records it)."""
        if self.pairs is None:
            return {"couplings": "independent"}
        return {"couplings": "pairs", "pairs_digest": pairs_digest(self.pairs)}
