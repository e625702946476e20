"""Zero-shot editing with any consistency-type model f(x, σ) (EDM convention, x = x0 + σ·n)
(Song et al. 2023, "Consistency Models", Alg. 4; METHODS.md §1).

The multistep sampler with the known part re-imposed on x0 after every evaluation:

    y ← A⁻¹[(A·y)⊙Ω + 0⊙(1 − Ω)]                     (only the known coordinates of y are used)
    x = y + τ_0·z;  x ← f(x, τ_0);  x ← A⁻¹[(A·y)⊙Ω + (A·x)⊙(1 − Ω)]
    for n ≥ 1:  x ← x + √(τ_n² − ε²)·z_n;  x ← f(x, τ_n);  x ← A⁻¹[(A·y)⊙Ω + (A·x)⊙(1 − Ω)]

with A an orthogonal (so A⁻¹ = Aᵀ) linear map and Ω the mask of the KNOWN coordinates of A·x
(the paper's mask marks the unknown ones: Ω here is its complement):
- inpainting: A = I, Ω = the known pixels;
- colorization: per pixel, the 3×3 orthogonal basis whose first vector is the luminance
  (0.2989, 0.5870, 0.1140)/‖·‖; Ω = that first coordinate (the luminance) everywhere;
- super-resolution: per channel and k×k patch, the k²×k² orthogonal basis whose first vector is
  uniform (1/k); Ω = that first coordinate (the patch mean, times k).
Any model family provides its f through its module's `consistency_fn(model)` (cd, ct, scm, ctm,
ayf); z_0 is the given noise, the later z_n are drawn with `torch.randn_like` (as
`samplers.cm_multistep`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as Fn

LUMINANCE = (0.2989, 0.5870, 0.1140)


@dataclass
class Operator:
    """An orthogonal change of basis A (forward), its inverse (Aᵀ), and the known-coordinate mask Ω
    (broadcastable to A·x; 1 = known)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    known: torch.Tensor

    def impose(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A⁻¹[(A·y)⊙Ω + (A·x)⊙(1 − Ω)]."""
        Ay, Ax = self.forward(y), self.forward(x)
        return self.inverse(torch.where(self.known.bool(), Ay, Ax))


def orthogonal_basis(first: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix Q (columns = basis vectors) whose first column is first/‖first‖."""
    n = first.numel()
    m = torch.eye(n, dtype=torch.float64)
    m[:, 0] = first.double()
    q, _ = torch.linalg.qr(m)
    if q[:, 0] @ first.double() < 0:
        q = -q
    return q


def inpainting(mask: torch.Tensor) -> Operator:
    """A = I; `mask` (broadcastable to x, 1 = known pixel)."""
    return Operator(lambda x: x, lambda u: u, mask)


def colorization() -> Operator:
    """Per-pixel 3×3 orthogonal basis with the normalised luminance first; known = luminance."""
    Q = orthogonal_basis(torch.tensor(LUMINANCE))          # columns q_j

    def fwd(x):  # (N, 3, H, W) -> coordinates u_j = q_j · x
        return torch.einsum("cj,nchw->njhw", Q.to(x), x)

    def inv(u):
        return torch.einsum("cj,njhw->nchw", Q.to(u), u)
    known = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    return Operator(fwd, inv, known)


def super_resolution(k: int) -> Operator:
    """Per channel and k×k patch, the orthogonal basis with the uniform vector first; known = patch mean."""
    Q = orthogonal_basis(torch.ones(k * k))

    def fwd(x):  # (N, C, H, W) -> (N, C, H/k, W/k, k²)
        n, c, h, w = x.shape
        p = x.reshape(n, c, h // k, k, w // k, k).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // k, w // k, k * k)
        return p @ Q.to(x)

    def inv(u):
        n, c, hk, wk, _ = u.shape
        p = u @ Q.to(u).T
        return p.reshape(n, c, hk, wk, k, k).permute(0, 1, 2, 4, 3, 5).reshape(n, c, hk * k, wk * k)
    known = torch.zeros(k * k)
    known[0] = 1
    return Operator(fwd, inv, known)


@torch.no_grad()
def edit(f, y_known: torch.Tensor, operator: Operator, taus: list[float], eps: float, z: torch.Tensor,
         **cond) -> torch.Tensor:
    """Alg. 4 of Consistency Models with `operator` (see module docstring). `y_known` is an image
    whose known coordinates (Ω) hold the observation; the rest of it is ignored."""
    known = operator.known.to(y_known.device)
    op = Operator(operator.forward, operator.inverse, known)
    y = op.impose(torch.zeros_like(y_known), y_known)
    x = y + taus[0] * z
    x = op.impose(f(x, torch.full((x.shape[0],), taus[0], dtype=x.dtype, device=x.device), **cond), y)
    for tau in taus[1:]:
        x = x + (tau**2 - eps**2) ** 0.5 * torch.randn_like(x)
        x = op.impose(f(x, torch.full((x.shape[0],), tau, dtype=x.dtype, device=x.device), **cond), y)
    return x


def inpaint(f, y_known, mask, taus, eps, z, **cond) -> torch.Tensor:
    """Fill the pixels where `mask` is 0, keeping those where it is 1."""
    return edit(f, y_known, inpainting(mask), taus, eps, z, **cond)


def colorize(f, y_known, taus, eps, z, **cond) -> torch.Tensor:
    """Colour an RGB image keeping its luminance (y_known: (N, 3, H, W) with that luminance, e.g.
    `gray_to_rgb(L)`)."""
    return edit(f, y_known, colorization(), taus, eps, z, **cond)


def super_resolve(f, y_known, k, taus, eps, z, **cond) -> torch.Tensor:
    """Upsample keeping every k×k patch mean (y_known: full-size image with those means, e.g.
    `upsample_nearest(low, k)`)."""
    return edit(f, y_known, super_resolution(k), taus, eps, z, **cond)


def gray_to_rgb(L: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luminance L = 0.2989·R + 0.5870·G + 0.1140·B -> an RGB image with that luminance."""
    l = torch.tensor(LUMINANCE, dtype=L.dtype, device=L.device).reshape(1, 3, 1, 1)
    return L * l / (l**2).sum()


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luminance 0.2989·R + 0.5870·G + 0.1140·B."""
    l = torch.tensor(LUMINANCE, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x * l).sum(1, keepdim=True)


def upsample_nearest(low: torch.Tensor, k: int) -> torch.Tensor:
    """Nearest-neighbour ×k: a full-size image whose k×k patch means are the low-resolution pixels."""
    return Fn.interpolate(low, scale_factor=k, mode="nearest")


def patch_means(x: torch.Tensor, k: int) -> torch.Tensor:
    return Fn.avg_pool2d(x, k)
