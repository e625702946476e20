"""Noise processes, and the one place where time conventions are converted (docs/methods.md §0).

Each paper labels time its own way. Every process here is described by what it does to clean data
x0 with standard-normal ε:

    x_t = α(t)·x0 + β(t)·ε  =  a(t)·(x0 + σ(t)·ε),   a = α,  σ = β/α,

so a model trained in one process can be queried at an EDM noise level σ by rescaling its input
(`to_edm(t)` -> (a, σ), `from_edm(σ)` -> t). Nothing else in the code base converts times by hand.

| process   | forward process (x0: data)                       | a(t)            | σ(t)                |
|-----------|--------------------------------------------------|-----------------|---------------------|
| edm       | x = x0 + σ·ε                                     | 1               | t                   |
| trigflow  | x = cos t·x0 + sin t·z,  z ~ N(0, σ_d²)          | cos t           | σ_d·tan t           |
| flow      | x = t·x0 + (1−t)·ε   (t = 1 data, RF)            | t               | (1 − t)/t           |
| fm        | x = (1−t)·x0 + t·ε   (t = 1 noise, AYF)          | 1 − t           | t/(1 − t)           |
| caf       | x = κ(t)·x0 + (1−κ(t))·ε,  κ = t² + h(t − t²)    | κ               | (1 − κ)/κ           |
| vp_cosine | x = √γ(t)·x0 + √(1−γ(t))·ε                       | √γ              | √((1 − γ)/γ)        |

The common denoiser interface is the EDM x0-predictor D_edm(x_σ, σ, **cond); every process turns one
into its own x0-predictor D(x_t, t, **cond) and back. The flow-type processes also convert between
a velocity and an x0-prediction. `NoiseProcess` is the recipe/`model.json` field type (a mapping
without a `process` key is EDM, as old recipes wrote it); the functions `to_edm(conv, ...)`,
`from_edm(conv, ...)`, `denoiser_in(conv, ...)` are the older string-keyed interface.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Annotated, Callable, Literal, Union

import torch
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from .config import FieldError, Strict

Convention = Literal["edm", "trigflow", "fm", "vp"]
Tensor = torch.Tensor


def col(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample (N,) tensor reshaped to broadcast against x (N, ...)."""
    return v.reshape(-1, *[1] * (x.ndim - 1))




def _bc(v: Tensor, x: Tensor) -> Tensor:
    """A scalar stays a scalar; a per-sample (N,) tensor is made to broadcast against x."""
    return v if v.ndim == 0 else col(v, x)


def _time(t) -> Tensor:
    """A time as a tensor: float64 stays float64, anything else becomes float32."""
    return torch.as_tensor(t, dtype=torch.float64 if torch.is_tensor(t) and t.dtype == torch.float64 else torch.float32)


def _lognormal(mean: float, std: float, n: int, device, generator) -> Tensor:
    """n samples of exp(N(mean, std²))."""
    z = torch.randn(n, device=device, generator=generator)
    return (mean + std * z).exp()


def _rf_grid(N: int, eps: float) -> Tensor:
    """Rectified flow's Euler grid t_i = i/N·(1 − ε) + ε, i = 0..N−1, then 1 (float64)."""
    i = torch.arange(N, dtype=torch.float64)
    return torch.cat([i / N * (1 - eps) + eps, torch.ones(1, dtype=torch.float64)])


class Process(Strict):
    """A forward process x_t = α(t)·x0 + β(t)·ε = a(t)·(x0 + σ(t)·ε), ε ~ N(0, I) (docs/methods.md §0).

    Subclasses give `alpha_beta`, `from_edm`, `sample_t` and `grid`; the rest follows."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)

    process: str = Field(description="which process this is (each subclass fixes it)")

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α(t), β(t)): the weights of data and of standard-normal noise in x_t."""
        raise NotImplementedError

    def to_edm(self, t) -> tuple[Tensor, Tensor]:
        """(a(t), σ(t)) such that x_t = a·(x0 + σ·ε): a = α, σ = β/α."""
        alpha, beta = self.alpha_beta(_time(t))
        return alpha, beta / alpha

    def from_edm(self, sigma) -> Tensor:
        """The inverse of σ(t): this process's time at EDM noise level `sigma`."""
        raise NotImplementedError

    def forward(self, x0: Tensor, t, eps: Tensor) -> Tensor:
        """x_t = α(t)·x0 + β(t)·eps, with eps standard normal and t scalar or per-sample (N,)."""
        alpha, beta = self.alpha_beta(_time(t))
        return _bc(alpha, x0) * x0 + _bc(beta, x0) * eps

    def sample_t(self, n: int, device=None, generator=None) -> Tensor:
        """n training times drawn from the paper's training distribution."""
        raise NotImplementedError

    def grid(self, N: int) -> Tensor:
        """The N-step sampler grid: N + 1 times (float64) from t_noise to t_data."""
        raise NotImplementedError

    @property
    def t_noise(self) -> float:
        """The time at which sampling starts (the noise end of `grid`)."""
        return float(self.grid(1)[0])

    @property
    def t_data(self) -> float:
        """The time of clean data (the end of `grid`)."""
        return float(self.grid(1)[-1])

    def draw(self, n: int, shape, generator: torch.Generator | None = None) -> Tensor:
        """n draws (n, *shape) of the noise end, on the CPU: standard normal (a flow with a `source`
        draws its mixture instead). Samplers, pair sets and evaluations start from these."""
        return torch.randn((n, *shape), generator=generator)

    def draw_like(self, x: Tensor) -> Tensor:
        """`draw` shaped, typed and placed like x (training batches): torch.randn_like(x)."""
        return torch.randn_like(x)

    def from_edm_denoiser(self, D_edm: Callable) -> Callable:
        """An EDM x0-predictor D_edm(x_σ, σ) as this process's x0-predictor D(x_t, t) = D_edm(x_t/a(t), σ(t))."""
        def D(x_t: Tensor, t, **cond) -> Tensor:
            a, sigma = self.to_edm(t)
            return D_edm(x_t / _bc(a, x_t), sigma, **cond)
        return D

    def to_edm_denoiser(self, D: Callable) -> Callable:
        """This process's x0-predictor D(x_t, t) as an EDM one: D_edm(x, σ) = D(a(t)·x, t), t = t(σ)."""
        def D_edm(x: Tensor, sigma, **cond) -> Tensor:
            t = self.from_edm(sigma)
            a, _ = self.to_edm(t)
            return D(_bc(a, x) * x, t, **cond)
        return D_edm


class _Flow(Process):
    """A process with a velocity target linear in (x0, ε): v = α_v(t)·x0 + β_v(t)·ε (`velocity_coefs`).
    For TrigFlow, RF and FM, v = dx_t/dt; for CAF it is the initial velocity v0."""

    def velocity_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α_v, β_v): the weights of data and of standard-normal noise in the velocity target."""
        raise NotImplementedError

    def velocity_to_x0(self, x_t: Tensor, t, v: Tensor) -> Tensor:
        """Solve x_t = α·x0 + β·ε, v = α_v·x0 + β_v·ε for x0:  x0 = (β_v·x_t − β·v)/(α·β_v − α_v·β)."""
        t = _time(t)
        (alpha, beta), (va, vb) = self.alpha_beta(t), self.velocity_coefs(t)
        det = alpha * vb - va * beta
        return _bc(vb / det, x_t) * x_t - _bc(beta / det, x_t) * v

    def x0_to_velocity(self, x_t: Tensor, t, x0: Tensor) -> Tensor:
        """v = α_v·x0 + β_v·ε with the noise ε = (x_t − α·x0)/β implied by x_t."""
        t = _time(t)
        (alpha, beta), (va, vb) = self.alpha_beta(t), self.velocity_coefs(t)
        eps = (x_t - _bc(alpha, x_t) * x0) / _bc(beta, x_t)
        return _bc(va, x_t) * x0 + _bc(vb, x_t) * eps


class _EDMLevels(Process):
    """Settings shared by processes whose sampler uses the Karras σ grid (EDM, and TrigFlow through it)."""

    sigma_min: float = Field(0.002, gt=0, description="smallest noise level σ of the sampler grid")
    sigma_max: float = Field(80.0, gt=0, description="largest noise level σ (generator input is σ_max·z)")
    rho: float = Field(7.0, gt=0, description="curvature ρ of the Karras grid")
    sigma_data: float = Field(0.5, gt=0, description="data standard deviation σ_d")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.sigma_min < self.sigma_max:
            raise FieldError("sigma_min", f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self

    def karras_sigmas(self, N: int) -> Tensor:
        """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..N−1 (descending; Karras et al.
        2022, Eq. 5; docs/methods.md §0)."""
        i = torch.arange(N, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((hi + i / max(N - 1, 1) * (lo - hi)) ** self.rho).float()

    def grid(self, N: int) -> Tensor:
        """The Karras grid of N levels then σ = 0, in this process's time."""
        return self.from_edm(torch.cat([self.karras_sigmas(N).double(), torch.zeros(1, dtype=torch.float64)]))


class EDM(_EDMLevels):
    """The EDM / VE process x_σ = x0 + σ·ε with its preconditioning (Karras et al. 2022; docs/methods.md §0).

    Time is the noise level itself: t = σ."""

    process: Literal["edm"] = Field("edm", description="EDM / VE: x = x0 + σ·ε")
    P_mean: float = Field(-1.2, description="training: mean of ln σ")
    P_std: float = Field(1.2, gt=0, description="training: standard deviation of ln σ")

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def from_edm(self, sigma) -> Tensor:
        return torch.as_tensor(sigma)

    def precond(self, sigma: Tensor):
        """c_skip, c_out, c_in, c_noise of EDM (Table 1 of Karras et al.)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """DSM weight λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (Table 1 of Karras et al.)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, n: int, device=None, generator=None) -> Tensor:
        """Training noise levels: ln σ ~ N(P_mean, P_std²) (Table 1 of Karras et al.)."""
        return _lognormal(self.P_mean, self.P_std, n, device, generator)

    sample_t = sample_sigma

    def denoiser(self, net: torch.nn.Module) -> "EDMDenoiser":
        return EDMDenoiser(net, self)


class TrigFlow(_EDMLevels, _Flow):
    """sCM's TrigFlow x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d² I), t ∈ [0, π/2] (Lu & Song 2024, §3;
    docs/methods.md §4). SNR matching with EDM gives σ = σ_d·tan t, t = arctan(σ/σ_d).

    Velocity: dx_t/dt = cos t·z − sin t·x0, the target of σ_d·F_θ in sCM's diffusion loss.
    Training: t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²). Grid: the Karras σ grid mapped to t, then 0."""

    process: Literal["trigflow"] = Field("trigflow", description="TrigFlow: x = cos t·x0 + sin t·z")
    P_mean: float = Field(-1.0, description="training: mean of ln σ, σ = σ_d·tan t")
    P_std: float = Field(1.4, gt=0, description="training: standard deviation of ln σ")

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cos(t), self.sigma_data * torch.sin(t)

    def to_edm(self, t) -> tuple[Tensor, Tensor]:
        t = _time(t)
        return torch.cos(t), self.sigma_data * torch.tan(t)

    def velocity_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.sin(t), self.sigma_data * torch.cos(t)

    def from_edm(self, sigma) -> Tensor:
        return torch.atan(torch.as_tensor(sigma) / self.sigma_data)

    def sample_t(self, n: int, device=None, generator=None) -> Tensor:
        return self.from_edm(_lognormal(self.P_mean, self.P_std, n, device, generator))


class _Source(_Flow):
    """A flow whose noise end may be a 2D toy Gaussian mixture instead of N(0, I): mixture → mixture
    transport (rectified flow's 2D toy, CAF's synthetic experiment; docs/methods.md §2, §13). `draw`
    returns the mixture's samples; the forward process, velocities and samplers are unchanged
    (ε is then the source sample). The EDM conversions assume Gaussian noise: a flow with a source
    is no EDM denoiser's peer."""

    source: str | None = Field(
        None, description="None: standard-normal noise; or a 2D Gaussian-mixture toy (a data.name of kind "
        "toy, e.g. triangle) drawn as the noise end (mixture → mixture; data must be 2D)")

    @field_validator("source")
    @classmethod
    def _a_toy_mixture(cls, v: str | None) -> str | None:
        from .data import TOY_DENSITIES  # data imports no noise process; kept local all the same
        mixtures = [k for k, f in TOY_DENSITIES.items() if f().is_mixture]
        if v is not None and v not in mixtures:
            raise ValueError(f"source {v!r} is not a 2D toy Gaussian mixture (known: {', '.join(mixtures)})")
        return v

    omit_at_default = {"source": None}  # processes written before it existed keep their digests (Strict)

    def draw(self, n: int, shape, generator: torch.Generator | None = None) -> Tensor:
        if self.source is None:
            return super().draw(n, shape, generator)
        if tuple(shape) != (2,):
            raise ValueError(f"noise.source {self.source!r} draws 2D points, not samples of shape {tuple(shape)}")
        from .data import TOY_DENSITIES
        return TOY_DENSITIES[self.source]().sample(n, generator)[0]

    def draw_like(self, x: Tensor) -> Tensor:
        if self.source is None:
            return torch.randn_like(x)
        return self.draw(x.shape[0], x.shape[1:]).to(x)


class Flow(_Source):
    """Rectified flow, t = 1 is data: x_t = t·x1 + (1 − t)·z0 (Liu et al. 2022, Eq. 1; docs/methods.md §13).
    Here x1 is the data (`x0` in method signatures) and z0 = ε the noise.

    Velocity: x1 − z0. Training: t ~ U[ε_t, 1]. Grid: RF's Euler grid t_i = i/N·(1 − ε_t) + ε_t, then 1."""

    process: Literal["flow"] = Field("flow", description="rectified flow, t = 1 data")
    eps_t: float = Field(1e-3, gt=0, lt=1, description="smallest time (noise end) of training and sampling")

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, 1 - t

    def velocity_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones_like(t)
        return one, -one

    def from_edm(self, sigma) -> Tensor:
        return 1 / (1 + torch.as_tensor(sigma))

    def sample_t(self, n: int, device=None, generator=None) -> Tensor:
        return torch.rand(n, device=device, generator=generator) * (1 - self.eps_t) + self.eps_t

    def grid(self, N: int) -> Tensor:
        return _rf_grid(N, self.eps_t)


class FM(_Flow):
    """Flow matching with t = 1 noise: x_t = (1 − t)·x0 + t·ε (Align Your Flow's labelling;
    docs/methods.md §0, §3). It is `Flow` with time t ↦ 1 − t.

    Velocity: dx_t/dt = ε − x0. Training: t ~ U[0, 1 − ε_t]. Grid: 1 − RF's Euler grid."""

    process: Literal["fm"] = Field("fm", description="flow matching, t = 1 noise")
    eps_t: float = Field(1e-3, gt=0, lt=1, description="training and sampling stay below t = 1 − eps_t")

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t

    def velocity_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones_like(t)
        return -one, one

    def from_edm(self, sigma) -> Tensor:
        sigma = torch.as_tensor(sigma)
        return sigma / (1 + sigma)

    def sample_t(self, n: int, device=None, generator=None) -> Tensor:
        return torch.rand(n, device=device, generator=generator) * (1 - self.eps_t)

    def grid(self, N: int) -> Tensor:
        return 1 - _rf_grid(N, self.eps_t)


class CAF(_Source):
    """Constant Acceleration Flow, t = 0 noise x0, t = 1 data x1 (Park et al. 2024; docs/methods.md §2):
    x_t = (1 − t²)·x0 + t²·x1 + v0·(t − t²). With the true initial velocity v0 = h·(x1 − x0) this is
    x_t = (1 − κ)·x0 + κ·x1, κ(t) = t² + h·(t − t²). (`x0` in method signatures is the data x1.)

    Velocity: the initial velocity v0 = h·(x1 − x0) that CAF's velocity network regresses at every t
    (not dx_t/dt). Training: t uniform on {0, 1/1000, …, 1}. Grid: t_i = i/N."""

    process: Literal["caf"] = Field("caf", description="Constant Acceleration Flow, t = 1 data")
    h: float = Field(1.5, description="initial-velocity scale: v0 = h·(x1 − x0); must lie in (0, 2]")

    @field_validator("h")
    @classmethod
    def _monotone(cls, h: float) -> float:
        if not 0 < h <= 2:
            raise ValueError(
                f"h = {h}: κ(t) = t² + h(t − t²) has κ'(0) = h and κ'(1) = 2 − h, so it increases on [0, 1] "
                "(one time per noise level) only for 0 ≤ h ≤ 2, and h = 0 leaves v0 = 0 with no information; "
                "use 0 < h ≤ 2")
        return h

    def kappa(self, t: Tensor) -> Tensor:
        """κ(t) = t² + h·(t − t²), the data weight of the marginal (κ = t when h = 1)."""
        return t * t + self.h * (t - t * t)

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        k = self.kappa(t)
        return k, 1 - k

    def velocity_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.full_like(t, self.h)
        return h, -h

    def from_edm(self, sigma) -> Tensor:
        """κ = 1/(1 + σ), then `t_of_kappa`."""
        return self.t_of_kappa(1 / (1 + torch.as_tensor(sigma)))

    def t_of_kappa(self, k) -> Tensor:
        """The inverse of κ(t): the root in [0, 1] of (1 − h)t² + h·t − κ = 0, written in the form
        t = 2κ/(h + √(h² + 4(1 − h)κ)) that holds for h = 1 too and does not cancel."""
        k = torch.as_tensor(k)
        return 2 * k / (self.h + (self.h**2 + 4 * (1 - self.h) * k).sqrt())

    def sample_t(self, n: int, device=None, generator=None, levels: int = 1000) -> Tensor:
        """t uniform on {0, 1/K, …, 1}, K = `levels` (CAF's `UniformSampler`: 1000; its GAN stage: 10)."""
        return torch.randint(0, levels + 1, (n,), device=device, generator=generator) / levels

    def grid(self, N: int) -> Tensor:
        return torch.arange(N + 1, dtype=torch.float64) / N


class VPCosine(Process):
    """VP with Analog Bits' cosine schedule: x_t = √γ(t)·x0 + √(1 − γ(t))·ε,
    γ(t) = cos²((t + s)/(1 + d)·π/2) (Chen et al. 2022; docs/methods.md §7, §9).

    Training: t ~ U[0, 1]. Grid: t_i = 1 − i/N."""

    process: Literal["vp_cosine"] = Field("vp_cosine", description="VP, Analog Bits' cosine schedule")
    s: float = Field(2e-4, ge=0, description="time offset s of the cosine schedule")
    d: float = Field(2.5e-4, ge=0, description="time stretch d of the cosine schedule (d ≥ s keeps γ decreasing)")

    @model_validator(mode="after")
    def _monotone(self):
        if self.s > self.d:
            raise FieldError("s", f"s ({self.s}) > d ({self.d}): the cosine passes π/2 before t = 1 and γ rises again")
        return self

    def gamma(self, t: Tensor) -> Tensor:
        """γ(t) = cos²((t + s)/(1 + d)·π/2)."""
        return torch.cos((t + self.s) / (1 + self.d) * math.pi / 2) ** 2

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        g = self.gamma(t)
        return g.sqrt(), (1 - g).sqrt()

    def to_edm(self, t) -> tuple[Tensor, Tensor]:
        g = self.gamma(_time(t))
        return g.sqrt(), ((1 - g) / g).sqrt()

    def from_edm(self, sigma) -> Tensor:
        """γ = 1/(1 + σ²), then invert the cosine."""
        g = 1 / (1 + torch.as_tensor(sigma) ** 2)
        return torch.acos(g.sqrt()) * 2 / math.pi * (1 + self.d) - self.s

    def sample_t(self, n: int, device=None, generator=None) -> Tensor:
        return torch.rand(n, device=device, generator=generator)

    def grid(self, N: int) -> Tensor:
        return 1 - torch.arange(N + 1, dtype=torch.float64) / N


# ----------------------------------------------------------------------------- the recipe field type

PROCESSES: dict[str, type[Process]] = {
    cls.model_fields["process"].default: cls for cls in (EDM, TrigFlow, Flow, FM, CAF, VPCosine)}


def _edm_if_untagged(v):
    """Old recipes and model.json files name no process (`noise: {sigma_max: 80}`): they mean EDM."""
    if isinstance(v, Mapping) and "process" not in v:
        return {**v, "process": "edm"}
    return v


NoiseProcess = Annotated[
    Annotated[Union[EDM, TrigFlow, Flow, FM, CAF, VPCosine], Field(discriminator="process")],
    BeforeValidator(_edm_if_untagged)]

_NOISE = TypeAdapter(NoiseProcess)


def load_process(d: Mapping | None) -> Process:
    """The process of a `model.json` "noise" dict, old (no "process": EDM) or new; None is the default EDM."""
    return _NOISE.validate_python({} if d is None else d)


# ----------------------------------------------------------------------------- string-keyed interface

def vp_gamma(t: Tensor) -> Tensor:
    """Cosine schedule of Analog Bits: γ(t) = cos²((t + 2e-4)/(1 + 2.5e-4) · π/2)."""
    return _convention("vp").gamma(t)


@functools.lru_cache(maxsize=None)
def _convention(conv: str, sigma_data: float = 0.5) -> Process:
    cls = {"edm": EDM, "trigflow": TrigFlow, "fm": FM, "vp": VPCosine}.get(conv)
    if cls is None:
        raise ValueError(f"unknown time convention {conv!r}")
    return cls(sigma_data=sigma_data) if "sigma_data" in cls.model_fields else cls()


def to_edm(conv: Convention, t: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """(a(t), σ(t)) such that x_t = a(t)·(x0 + σ(t)·ε) in convention `conv` ("vp" is vp_cosine)."""
    return _convention(conv, sigma_data).to_edm(t)


def from_edm(conv: Convention, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """Inverse of `to_edm`: the time t of convention `conv` at which σ(t) = sigma."""
    return _convention(conv, sigma_data).from_edm(sigma)


def denoiser_in(conv: Convention, D_edm: Callable, sigma_data: float = 0.5) -> Callable:
    """Wrap an EDM denoiser D(x_σ, σ) as a denoiser of convention `conv`: D(x_t, t) -> x0."""
    return _convention(conv, sigma_data).from_edm_denoiser(D_edm)


class EDMDenoiser(torch.nn.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise): a raw network made into an x0-predictor."""

    def __init__(self, net: torch.nn.Module, edm: EDM):
        super().__init__()
        self.net, self.edm = net, edm

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.edm.precond(sigma)
        F = self.net(col(c_in, x) * x, c_noise, **cond)
        return col(c_skip, x) * x + col(c_out, x) * F
