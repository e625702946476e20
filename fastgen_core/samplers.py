"""Samplers shared by methods. A denoiser is any callable D(x, σ, **cond) -> x0 in the EDM
convention (other conventions are wrapped by `noise.denoiser_in`)."""
from __future__ import annotations

import torch

from .noise import EDM, col


def per_sample(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (N,) noise level as a per-sample (N,) tensor."""
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(x.shape[0])


def heun_step(D, x: torch.Tensor, s_cur, s_next, **cond) -> torch.Tensor:
    """One step of EDM's 2nd-order Heun solver of dx/dσ = (x − D(x, σ))/σ from s_cur to s_next
    (floats or per-sample tensors); samples whose s_next is 0 take the Euler step. A float s_next
    of 0 skips the second evaluation; per-sample tensors always make it (deciding from their values
    would read the device and stall a GPU every step)."""
    sc, sn = per_sample(s_cur, x), per_sample(s_next, x)
    d = (x - D(x, sc, **cond)) / col(sc, x)
    x_e = x + col(sn - sc, x) * d
    if not torch.is_tensor(s_next) and s_next <= 0:
        return x_e
    sn_safe = torch.where(sn > 0, sn, torch.ones_like(sn))
    d2 = (x_e - D(x_e, sn_safe, **cond)) / col(sn_safe, x)
    x_h = x + col(sn - sc, x) * (d + d2) / 2
    return torch.where(col(sn > 0, x), x_h, x_e)


def euler_step(D, x: torch.Tensor, s_cur, s_next, **cond) -> torch.Tensor:
    sc, sn = per_sample(s_cur, x), per_sample(s_next, x)
    return x + col(sn - sc, x) * (x - D(x, sc, **cond)) / col(sc, x)


@torch.no_grad()
def edm_sample(D, z: torch.Tensor, noise: EDM, steps: int, solver: str = "heun", **cond) -> torch.Tensor:
    """Solve the PF-ODE from x = σ_max·z down the Karras grid of `steps` levels to 0.
    NFE: heun 2·steps − 1, euler steps."""
    sigmas = noise.karras_sigmas(steps).tolist() + [0.0]
    x = z * sigmas[0]
    step = heun_step if solver == "heun" else euler_step
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = step(D, x, s_cur, s_next, **cond)
    return x


def teacher_sample(D, z: torch.Tensor, noise: EDM, nfe: int, **cond) -> torch.Tensor:
    """Best use of an NFE budget for an ODE teacher: Euler for 1–2 NFE, Heun with
    (nfe + 1) // 2 steps otherwise (2·steps − 1 ≤ nfe evaluations)."""
    if nfe <= 2:
        return edm_sample(D, z, noise, nfe, "euler", **cond)
    return edm_sample(D, z, noise, (nfe + 1) // 2, "heun", **cond)


def teacher_nfe(nfe: int) -> int:
    """Evaluations `teacher_sample` actually spends for a budget of `nfe`."""
    return nfe if nfe <= 2 else 2 * ((nfe + 1) // 2) - 1


@torch.no_grad()
def cm_multistep(f, z: torch.Tensor, taus: list[float], eps: float, **cond) -> torch.Tensor:
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1):
    x = τ_0·z; x0 = f(x, τ_0); for n ≥ 1: x = x0 + √(τ_n² − ε²)·z_n; x0 = f(x, τ_n)."""
    x = z * taus[0]
    x0 = f(x, per_sample(taus[0], x), **cond)
    for tau in taus[1:]:
        x = x0 + (tau**2 - eps**2) ** 0.5 * torch.randn_like(x0)
        x0 = f(x, per_sample(tau, x), **cond)
    return x0


# ----------------------------------------------------------------------------- guidance
# Both return a denoiser D(x, σ, **cond) usable wherever one is expected (edm_sample,
# teacher_sample, heun_step, and as a distillation teacher).

def autoguided(D_main, D_weak, w: float):
    """Autoguidance (Karras et al. 2024, Eq. 2; docs/methods.md §12):
        D_w(x; σ) = D_weak(x; σ) + w·(D_main(x; σ) − D_weak(x; σ)).
    w = 1 gives D_main; w > 1 extrapolates away from the weaker guide (same task, same
    conditioning: it receives the same `**cond`)."""
    def D(x, sigma, **cond):
        d_weak = D_weak(x, sigma, **cond)
        return d_weak + w * (D_main(x, sigma, **cond) - d_weak)
    return D


def cfg_guided(D, w: float, num_classes: int):
    """Classifier-free guidance in the same form, for comparison with autoguidance:
        D_w(x; σ, c) = D(x; σ, ∅) + w·(D(x; σ, c) − D(x; σ, ∅)),
    with the null label ∅ = `num_classes` (the networks map it to "no label"). w = 1 is the
    conditional denoiser (note: Ho & Salimans' (1 + w) convention is this w − 1). Without
    class labels the denoiser is returned unguided."""
    def Dw(x, sigma, class_labels=None, **cond):
        if class_labels is None:
            return D(x, sigma, **cond)
        null = torch.full_like(class_labels, num_classes)
        d_uncond = D(x, sigma, class_labels=null, **cond)
        return d_uncond + w * (D(x, sigma, class_labels=class_labels, **cond) - d_uncond)
    return Dw
