"""Zero-shot editing with any consistency-type model f(x, σ) (EDM convention, x = x0 + σ·n)
(Song et al. 2023, "Consistency Models", Alg. 4; docs/methods.md §1).

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

import math
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

#----------------------------------------------------------------------------
# Editing tasks on a batch of true images: the observation, a naive baseline, what must be kept,
# and the error against the truth.

TASKS = ("inpaint", "superres", "colorize")
MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center", "random")
PEAK_TO_PEAK = 2.0  # images live in [-1, 1]


def make_mask(kind: str, n: int, h: int, w: int, fraction: float = 0.5,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Known-pixel mask (n, 1, h, w), 1 = known. `kind` names the region to fill: a half of the
    image, the `center` square of half the side, or (`random`) each pixel independently with
    probability `fraction`, per image."""
    m = torch.ones(n, 1, h, w)
    if kind == "left_half":
        m[..., : w // 2] = 0
    elif kind == "right_half":
        m[..., w // 2:] = 0
    elif kind == "top_half":
        m[..., : h // 2, :] = 0
    elif kind == "bottom_half":
        m[..., h // 2:, :] = 0
    elif kind == "center":
        m[..., h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    elif kind == "random":
        m = (torch.rand(n, 1, h, w, generator=generator) >= fraction).float()
    else:
        raise ValueError(f"unknown mask {kind!r} (known: {', '.join(MASKS)})")
    return m


def nearest_fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each unknown pixel (mask 0) takes the value of the nearest known pixel (Euclidean distance
    on the pixel grid, ties to the first in raster order)."""
    n, c, h, w = x.shape
    known = mask.expand(n, 1, h, w).reshape(n, h * w).bool()
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).double()
    d = torch.cdist(pos, pos)[None].expand(n, -1, -1).to(x.device)            # (n, target, source)
    src = d.masked_fill(~known[:, None, :], float("inf")).argmin(-1)           # (n, h·w)
    flat = x.reshape(n, c, h * w)
    filled = flat.gather(2, src[:, None, :].expand(n, c, h * w))
    return torch.where(known[:, None, :], flat, filled).reshape(x.shape)


def gray_image(L: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luminance -> the grey RGB image R = G = B with that luminance."""
    return (L / sum(LUMINANCE)).expand(-1, 3, -1, -1)


@dataclass
class Task:
    """One editing problem on a batch of true images: the operator, the observation y (an image
    whose known coordinates hold what is observed: masked image, nearest-upsampled low resolution,
    grey image), the naive baseline reconstruction, and `kept(x)`, the quantity editing must keep
    (known pixels, k×k patch means, luminance)."""

    name: str
    operator: Operator
    observed: torch.Tensor
    baseline: torch.Tensor
    kept: Callable[[torch.Tensor], torch.Tensor]
    baseline_name: str


def make_task(name: str, truth: torch.Tensor, mask: torch.Tensor | None = None, k: int = 2) -> Task:
    """The editing problem `name` (inpaint | superres | colorize) on `truth` (N, C, H, W)."""
    if name == "inpaint":
        if mask is None:
            raise ValueError("inpainting needs a mask")
        known = mask.expand(truth.shape[0], 1, *truth.shape[2:]).bool()
        observed = truth * mask
        return Task(name, inpainting(mask), observed, nearest_fill(truth, mask),
                    lambda x: x[known.expand_as(x)], "nearest known pixel")
    if name == "superres":
        low = patch_means(truth, k)
        return Task(name, super_resolution(k), upsample_nearest(low, k), upsample_nearest(low, k),
                    lambda x: patch_means(x, k), f"nearest upsampling ×{k}")
    if name == "colorize":
        if truth.shape[1] != 3:
            raise ValueError(f"colorization needs RGB images (3 channels), got {truth.shape[1]}")
        grey = gray_image(luminance(truth))
        return Task(name, colorization(), grey, grey, luminance, "grey image")
    raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio (dB) for images in [-1, 1]."""
    return float("inf") if mse == 0 else 10 * math.log10(PEAK_TO_PEAK**2 / mse)


def errors(task: Task, x: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Error of a reconstruction x against the truth: MSE (and PSNR) over the unknown coordinates
    of A·x (inpainting: the unknown pixels; super-resolution: the within-patch detail; colorization:
    the two chroma coordinates; A is orthogonal, so these are squared pixel errors), and over all
    pixels (N·C·H·W)."""
    d = x.double() - truth.double()
    u = task.operator.forward(d)
    unknown = ~task.operator.known.to(u.device).bool().expand_as(u)
    mse_unknown = float((u[unknown] ** 2).mean())
    mse_all = float((d**2).mean())
    return {"mse_unknown": mse_unknown, "psnr_unknown": psnr(mse_unknown), "mse_all": mse_all, "psnr_all": psnr(mse_all)}


def saturation(x: torch.Tensor) -> float:
    """Mean over pixels of (max − min over channels)/2: 0 for grey, up to 1 for pure colours."""
    return float((x.amax(1) - x.amin(1)).mean() / 2)


def edit_metrics(task: Task, edited: torch.Tensor, truth: torch.Tensor, mean: torch.Tensor | None = None) -> dict:
    """Errors against the truth of one edit per image, of the `mean` of several (if given) and of
    the baseline, and how far editing moved the kept part (`known_max_abs_change`:
    max |kept(x) − kept(truth)| over the edit and the mean; float rounding only)."""
    moved = [float((task.kept(x) - task.kept(truth)).abs().max()) for x in (edited, mean) if x is not None]
    out = {"task": task.name, "n_images": int(truth.shape[0]), "baseline_name": task.baseline_name,
           "edited": errors(task, edited, truth), "baseline": errors(task, task.baseline, truth),
           "known_max_abs_change": max(moved)}
    if mean is not None:
        out["edited_mean"] = errors(task, mean, truth)
    if task.name == "colorize":
        out["saturation"] = {"truth": saturation(truth), "edited": saturation(edited), "baseline": saturation(task.baseline)}
    return out
