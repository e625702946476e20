"""Plots people would rather look at than read: 2D samples over the data, image grids, and
quality vs NFE. matplotlib with the Agg backend (no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def scatter_2d(panels: dict[str, np.ndarray], data: np.ndarray, path: Path, lim: float | None = None) -> None:
    """One panel per (title → samples), each drawn over the real data in grey."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    lim = lim or float(np.abs(data).max() * 1.25)
    for ax, (title, s) in zip(axes[0], panels.items()):
        ax.scatter(data[:, 0], data[:, 1], s=1, c="0.8", rasterized=True)
        ax.scatter(s[:, 0], s[:, 1], s=1, c="C0", alpha=0.5, rasterized=True)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(images: np.ndarray, path: Path, title: str = "", nrow: int = 10) -> None:
    """Images in [-1, 1], shape (N, C, H, W), tiled into a grid."""
    imgs = np.clip((images[: nrow * nrow] + 1) / 2, 0, 1)
    n, c, h, w = imgs.shape
    rows = int(np.ceil(n / nrow))
    grid = np.ones((rows * (h + 1), nrow * (w + 1), c))
    for i, im in enumerate(imgs):
        r, k = divmod(i, nrow)
        grid[r * (h + 1): r * (h + 1) + h, k * (w + 1): k * (w + 1) + w] = im.transpose(1, 2, 0)
    fig, ax = plt.subplots(figsize=(nrow * 0.45, rows * 0.45 + 0.4))
    ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality_vs_nfe(curves: dict[str, dict[int, tuple[float, float]]], floor: float | None, metric: str,
                   path: Path) -> None:
    """curves: model → {nfe: (mean, std)}; the floor (real vs real) as a dashed line."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, pts in curves.items():
        nfe = sorted(pts)
        m = np.array([pts[k][0] for k in nfe])
        s = np.array([pts[k][1] for k in nfe])
        ax.errorbar(nfe, m, yerr=s, marker="o", capsize=3, label=name)
    if floor is not None:
        ax.axhline(floor, ls="--", c="k", lw=1, label="floor (real vs real)")
    ax.set(xscale="log", xlabel="NFE", ylabel=metric, title=f"{metric} vs NFE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
