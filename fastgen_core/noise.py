"""Noise processes and the one place where time conventions are converted (METHODS.md §0).

Every convention is described by what it does to clean data x0:

    x_t = a(t) · (x0 + σ(t) · ε),   ε ~ N(0, I)

so a model trained in any convention can be queried at an EDM noise level σ by rescaling its
input. `to_edm(conv, t)` returns (a, σ); `from_edm(conv, σ)` returns t. Nothing else in the code
base converts times by hand.

| convention | forward process                       | a(t)          | σ(t)              |
|------------|---------------------------------------|---------------|-------------------|
| edm        | x = x0 + σ z                          | 1             | t                 |
| trigflow   | x = cos t·x0 + sin t·z, z~N(0, σ_d²)  | cos t         | σ_d·tan t         |
| fm         | x = (1−t)·x0 + t·ε  (t=1 noise)       | 1 − t         | t / (1 − t)       |
| vp         | x = √γ(t)·x0 + √(1−γ(t))·ε            | √γ            | √((1−γ)/γ)        |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

Convention = Literal["edm", "trigflow", "fm", "vp"]


def vp_gamma(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule of Analog Bits: γ(t) = cos²((t + 2e-4)/(1 + 2.5e-4) · π/2)."""
    return torch.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2


def to_edm(conv: Convention, t: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(a(t), σ(t)) such that x_t = a(t)·(x0 + σ(t)·ε) (table above)."""
    t = torch.as_tensor(t, dtype=torch.float64 if torch.is_tensor(t) and t.dtype == torch.float64 else torch.float32)
    if conv == "edm":
        return torch.ones_like(t), t
    if conv == "trigflow":
        return torch.cos(t), sigma_data * torch.tan(t)
    if conv == "fm":
        return 1 - t, t / (1 - t)
    if conv == "vp":
        g = vp_gamma(t)
        return g.sqrt(), ((1 - g) / g).sqrt()
    raise ValueError(f"unknown time convention {conv!r}")


def from_edm(conv: Convention, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Inverse of `to_edm`: the time t of convention `conv` at which σ(t) = sigma."""
    sigma = torch.as_tensor(sigma)
    if conv == "edm":
        return sigma
    if conv == "trigflow":
        return torch.atan(sigma / sigma_data)
    if conv == "fm":
        return sigma / (1 + sigma)
    if conv == "vp":
        g = 1 / (1 + sigma**2)  # γ = 1/(1+σ²), then invert the cosine schedule
        return torch.acos(g.sqrt()) * 2 / math.pi * (1 + 2.5e-4) - 2e-4
    raise ValueError(f"unknown time convention {conv!r}")


def denoiser_in(conv: Convention, D_edm: Callable, sigma_data: float = 0.5) -> Callable:
    """Wrap an EDM denoiser D(x_σ, σ) as a denoiser of convention `conv`: D(x_t, t) -> x0."""
    def D(x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        a, sigma = to_edm(conv, t, sigma_data)
        a = a.reshape(-1, *[1] * (x_t.ndim - 1)) if a.ndim else a
        return D_edm(x_t / a, sigma, **cond)
    return D


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (N,) tensor reshaped to broadcast against x (N, ...)."""
    return v.reshape(-1, *[1] * (x.ndim - 1))


@dataclass(frozen=True)
class EDM:
    """The EDM / VE process x_σ = x0 + σ·z (Karras et al. 2022), with its preconditioning."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2

    def karras_sigmas(self, N: int) -> torch.Tensor:
        """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..N−1 (descending)."""
        i = torch.arange(N, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((hi + i / max(N - 1, 1) * (lo - hi)) ** self.rho).float()

    def precond(self, sigma: torch.Tensor):
        """c_skip, c_out, c_in, c_noise of EDM (Table 1 of Karras et al.)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """DSM weight λ(σ) = (σ² + σ_d²)/(σ·σ_d)²."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, n: int, device=None, generator=None) -> torch.Tensor:
        """Training noise levels: ln σ ~ N(P_mean, P_std²)."""
        z = torch.randn(n, device=device, generator=generator)
        return (self.P_mean + self.P_std * z).exp()

    def denoiser(self, net: torch.nn.Module) -> "EDMDenoiser":
        return EDMDenoiser(net, self)


class EDMDenoiser(torch.nn.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise): a raw network made into an x0-predictor."""

    def __init__(self, net: torch.nn.Module, edm: EDM):
        super().__init__()
        self.net, self.edm = net, edm

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.edm.precond(sigma)
        F = self.net(_col(c_in, x) * x, c_noise, **cond)
        return _col(c_skip, x) * x + _col(c_out, x) * F
