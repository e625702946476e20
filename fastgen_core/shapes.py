"""A small synthetic image folder: 16×16 RGB coloured shapes on black, four classes, as PNG files.

    write_shapes_folder("data/shapes16")    # or: fastgen shapes data/shapes16

writes the ImageFolder tree root/<class>/<i>.png that `data: {kind: images, name: folder}` loads
(fastgen_core/data.py `scan_folder`), with classes `cross`, `disc`, `square`, `triangle` (labels
0..3 in sorted order). Each image is one shape, filled with a colour from `PALETTE` at a random
brightness, at a random size and position fully inside the image. Shapes are drawn at
`SUPERSAMPLE`× the resolution and area-averaged down (antialiased edges), so the folder is clean
data with a known structure: a generator's samples should be single, sharp, one-colour shapes.

The tree is a pure function of (n_per_class, size, seed) and is written atomically: into a hidden
temporary folder beside `root` that is renamed to `root` only when complete, so an interrupted
write never leaves a folder that looks complete. `root/shapes.json` records the settings.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "PALETTE", "write_shapes_folder", "render_shape"]

CLASSES = ("cross", "disc", "square", "triangle")  # sorted: label i = CLASSES[i] in the folder loader
# Saturated hues (RGB in [0, 1]); each image scales its hue by a brightness in BRIGHTNESS.
PALETTE = ((1.0, 0.0, 0.0), (1.0, 0.6, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 0.0),
           (0.0, 1.0, 1.0), (0.2, 0.4, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0))
BRIGHTNESS = (0.6, 1.0)
RADIUS = (0.22, 0.4)   # shape half-extent as a fraction of the image side
SUPERSAMPLE = 4
MANIFEST = "shapes.json"


def render_shape(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Coverage mask (size, size) float in [0, 1] of one shape of half-extent `r` centred at
    (cx, cy) (pixel units of the final image), drawn at SUPERSAMPLE× and box-filtered down."""
    from PIL import Image, ImageDraw

    s = SUPERSAMPLE
    big = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(big)
    x, y, R = cx * s, cy * s, r * s
    if kind == "disc":
        d.ellipse([x - R, y - R, x + R, y + R], fill=255)
    elif kind == "square":
        q = R * 0.85  # same area scale as the disc, roughly
        d.rectangle([x - q, y - q, x + q, y + q], fill=255)
    elif kind == "triangle":  # upright equilateral triangle inscribed in the circle of radius R
        d.polygon([(x, y - R), (x + R * 0.866, y + R * 0.5), (x - R * 0.866, y + R * 0.5)], fill=255)
    elif kind == "cross":     # a plus sign, arms of half-width R / 3
        w = R / 3
        d.rectangle([x - R, y - w, x + R, y + w], fill=255)
        d.rectangle([x - w, y - R, x + w, y + R], fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {CLASSES}")
    small = big.resize((size, size), Image.BOX)  # area average: antialiased edges
    return np.asarray(small, dtype=np.float64) / 255.0


def _image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image: draws radius, centre (shape inside a 1-pixel margin),
    hue and brightness from `rng`, in that order."""
    r = rng.uniform(*RADIUS) * size
    lo, hi = r + 1.0, size - r - 1.0
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    colour = np.asarray(PALETTE[rng.integers(len(PALETTE))]) * rng.uniform(*BRIGHTNESS)
    mask = render_shape(kind, cx, cy, r, size)
    return np.round(mask[:, :, None] * colour * 255.0).astype(np.uint8)


def _write_png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(a, mode="RGB").save(path, format="PNG")


def write_shapes_folder(root: str | Path, n_per_class: int = 200, size: int = 16, seed: int = 0) -> Path:
    """Write root/<class>/<i>.png (n_per_class images per class, size×size RGB) and return root.

    Deterministic in `seed` (class c's images come from the generator seeded by (seed, c)).
    Atomic: the tree is built in a hidden temporary folder beside root and renamed into place when
    complete. An existing root written with the same settings is returned as is; one written with
    other settings (or not by this function) is an error, never overwritten.
    """
    root = Path(root)
    if n_per_class < 1 or size < 8:
        raise ValueError(f"need n_per_class >= 1 and size >= 8, got n_per_class={n_per_class}, size={size}")
    if seed < 0:
        raise ValueError(f"seed: need a number >= 0, got {seed}")
    settings = {"n_per_class": n_per_class, "size": size, "seed": seed, "classes": list(CLASSES)}
    if root.exists():
        return _check_existing(root, settings)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.partial-"))
    try:
        for c, kind in enumerate(CLASSES):
            rng = np.random.default_rng([seed, c])
            (tmp / kind).mkdir()
            for i in range(n_per_class):
                _write_png(tmp / kind / f"{i:05d}.png", _image(kind, size, rng))
        (tmp / MANIFEST).write_text(json.dumps(settings, indent=1) + "\n")
        os.rename(tmp, root)  # atomic on one filesystem; fails if root appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if root.exists():  # a concurrent writer finished first
            return _check_existing(root, settings)
        raise
    return root


def _check_existing(root: Path, settings: dict) -> Path:
    try:
        found = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        found = None
    if found != settings:
        why = f"its {MANIFEST} records {found}" if found else f"it has no {MANIFEST}: not written here"
        raise FileExistsError(f"{root} exists but does not hold the shapes folder for {settings} ({why}); "
                              "remove it or choose another root")
    return root
