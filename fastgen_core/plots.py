"""Plots people would rather look at than read: 2D samples over the data, image grids,
quality vs NFE, and precision vs recall. matplotlib with the Agg backend (no display needed)."""
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
                   path: Path, recipe: str = "", decades: float = 3.0) -> None:
    """curves: model → {nfe: (mean, std)}; the floor (real vs real) as a dashed line. Both axes are
    logarithmic, so a diverged model does not flatten every other line: points that cannot be drawn
    (not finite, or ≤ 0) are dropped, and points more than `decades` decades above the best value
    (or the floor) are clipped to the top edge (▲); both are listed in a note under the plot. The
    title names the recipe and the metric."""
    finite = [m for pts in curves.values() for m, _ in pts.values() if np.isfinite(m) and m > 0]
    lo = min(finite + ([floor] if floor and floor > 0 else []), default=1.0)
    top = lo * 10 ** decades
    dropped, clipped = [], []
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for i, (name, pts) in enumerate(curves.items()):
        keep = [k for k in sorted(pts) if np.isfinite(pts[k][0]) and pts[k][0] > 0]
        dropped += [f"{name}@{k}" for k in sorted(pts) if k not in keep]
        if not keep:
            continue
        m = np.array([pts[k][0] for k in keep])
        s = np.nan_to_num(np.array([pts[k][1] for k in keep]))
        over = m > top
        clipped += [f"{name}@{k} = {v:.3g}" for k, v, o in zip(keep, m, over) if o]
        c = f"C{i % 10}"
        shown = np.minimum(m, top)
        ax.errorbar(np.array(keep)[~over], m[~over], yerr=np.minimum(s, 0.99 * m)[~over], marker="o", capsize=3,
                    color=c, label=name)
        ax.plot(keep, shown, color=c, lw=1, alpha=0.5 if over.any() else 0)
        if over.any():
            ax.plot(np.array(keep)[over], shown[over], "^", color=c, ms=8)
    if floor is not None and floor > 0:
        ax.axhline(floor, ls="--", c="k", lw=1, label="floor (real vs real)")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=f"{metric} (log scale)",
           title=f"{recipe + ': ' if recipe else ''}{metric} vs NFE (lower is better)")
    ax.set_ylim(lo / 2, min(top * 1.5, max([*finite, lo]) * 2))
    ax.legend(fontsize=8)
    note = []
    if clipped:
        note.append("clipped (▲) at the top: " + ", ".join(clipped))
    if dropped:
        note.append("not drawn (not finite or ≤ 0): " + ", ".join(dropped))
    if note:
        fig.text(0.01, 0.005, "\n".join(note), fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 * len(note), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def precision_recall(points: dict[str, dict[int, tuple[float, float]]], floor: tuple[float, float] | None,
                     path: Path, recipe: str = "", k: int = 3) -> None:
    """points: model → {nfe: (precision, recall)} (means over seeds), one colour per model with
    each point labelled by its NFE; the floor (real vs real) as a black star. Fidelity up,
    diversity right: the ideal is the top-right corner."""
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    for i, (name, pts) in enumerate(points.items()):
        nfes = sorted(pts)
        p, r = np.array([pts[k_][0] for k_ in nfes]), np.array([pts[k_][1] for k_ in nfes])
        ax.plot(r, p, "o-", color=f"C{i % 10}", lw=1, ms=5, label=name)
        for x, y, nfe in zip(r, p, nfes):
            ax.annotate(str(nfe), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=f"C{i % 10}")
    if floor is not None:
        ax.plot(floor[1], floor[0], "k*", ms=11, label="floor (real vs real)")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall (diversity)", ylabel="precision (fidelity)",
           title=f"{recipe + ': ' if recipe else ''}precision vs recall (k = {k}; labels: NFE)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectories_2d(paths: dict[str, np.ndarray], data: np.ndarray, path: Path, n_paths: int = 150,
                    lim: float | None = None) -> None:
    """One panel per (title → sampled paths (N + 1, n, 2)): the first `n_paths` paths from noise
    (grey dots) to their end points (blue), over the real data in light grey."""
    n = len(paths)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    lim = lim or float(max(np.abs(data).max() * 1.25, 3.0))
    for ax, (title, p) in zip(axes[0], paths.items()):
        p = p[:, :n_paths]
        ax.scatter(data[:, 0], data[:, 1], s=1, c="0.85", rasterized=True)
        ax.plot(p[:, :, 0], p[:, :, 1], c="C1", lw=0.5, alpha=0.5)
        ax.scatter(p[0, :, 0], p[0, :, 1], s=2, c="0.4")
        ax.scatter(p[-1, :, 0], p[-1, :, 1], s=2, c="C0")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
