"""Datasets: 2D toy distributions with known density, scikit-learn digits, and image folders.

Everything is loaded into memory as float32 tensors. Toy samples are 2D points whose overall
per-axis std is roughly 0.5-1 (EDM's sigma_data = 0.5 is assumed downstream); images are
(C, H, W) in [-1, 1]. Every split and every toy sample is a pure function of `cfg.split_seed`.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastgen_core.config import DataConfig

OFF_SUPPORT_LOG_PROB = -30.0  # checkerboard log-density outside its support (finite on purpose)

#----------------------------------------------------------------------------
# Dataset container.


@dataclass
class Dataset:
    """Train and held-out samples, labels and (for toy data) the true density."""

    x: torch.Tensor                   # float32 train samples: (N, 2) toy, (N, C, H, W) in [-1, 1] images
    y: torch.Tensor | None            # int64 train labels, or None
    x_test: torch.Tensor              # held-out samples, same format
    y_test: torch.Tensor | None
    num_classes: int                  # 0 if unconditional (labels, if present, are for evaluation only)
    density: ToyDensity | None        # the known density for toy data, else None

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape, e.g. (2,) or (1, 8, 8)."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4


@lru_cache(maxsize=4)
def _load_data_json(cfg_json: str) -> Dataset:
    return load_data(DataConfig.model_validate_json(cfg_json))


def cached_data(cfg: DataConfig) -> Dataset:
    """`load_data`, memoised per settings in this process (several stages in one process, e.g. a
    Prefect flow or a test, load the same data once). Callers must not modify the tensors."""
    return _load_data_json(cfg.model_dump_json())


def load_data(cfg: DataConfig) -> Dataset:
    """Load the dataset described by `cfg`."""
    if cfg.kind == "toy":
        return _load_toy(cfg)
    if cfg.kind == "digits":
        return _load_digits(cfg)
    if cfg.kind == "images":
        return _load_images(cfg)
    raise ValueError(f"unknown data kind {cfg.kind!r}")

#----------------------------------------------------------------------------
# Toy densities.


class ToyDensity:
    """A known 2D density: a Gaussian mixture, or the uniform checkerboard.

    Mixture: `means` (K, 2), `covs` (K, 2, 2), `weights` (K,), `stds` (K, 2) = per-axis marginal
    stds, `labels` (K,) = class of each component. Modes are the components.
    Checkerboard: uniform on `num_modes` black squares of side `cell`; `means` are the square
    centres, `covs`/`stds` are None, `labels` = arange(num_modes). Modes are the squares.
    """

    def __init__(self, name: str, means, covs=None, weights=None, labels=None, cell: float | None = None):
        self.name = name
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = len(self.means)
        self.covs = None if covs is None else torch.as_tensor(covs, dtype=torch.float64)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.labels = torch.arange(k) if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        self.num_classes = int(self.labels.max()) + 1
        self.cell = cell
        if self.covs is not None:
            self._chol = torch.linalg.cholesky(self.covs)
            self._prec = torch.linalg.inv(self.covs)
            self._logdet = torch.logdet(self.covs)

    @property
    def num_modes(self) -> int:
        return len(self.means)

    @property
    def is_mixture(self) -> bool:
        return self.covs is not None

    @property
    def stds(self) -> torch.Tensor | None:
        return None if self.covs is None else self.covs.diagonal(dim1=-2, dim2=-1).sqrt()

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n points; returns (x float32 (n, 2), y int64 (n,) class labels)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        if self.is_mixture:
            z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
            x = self.means[comp] + (self._chol[comp] @ z[:, :, None])[:, :, 0]
        else:
            u = torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5
            x = self.means[comp] + u * self.cell
        return x.float(), self.labels[comp]

    def _mahalanobis_sq(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each point to each component: (N, K)."""
        d = x.double()[:, None, :] - self.means[None]
        return torch.einsum("nki,kij,nkj->nk", d, self._prec, d)

    def _cell_index(self, x: torch.Tensor) -> torch.Tensor:
        """Checkerboard: index of the black square containing each point, -1 elsewhere."""
        d = (x.double()[:, None, :] - self.means[None]).abs().amax(dim=-1)  # (N, K) Chebyshev distance
        inside = d < self.cell / 2
        return torch.where(inside.any(dim=1), inside.int().argmax(dim=1), -1).long()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (N,). Checkerboard: log of the uniform density on its support and
        OFF_SUPPORT_LOG_PROB (-30) off it."""
        if self.is_mixture:
            log_n = -0.5 * (self._mahalanobis_sq(x) + self._logdet + 2 * math.log(2 * math.pi))
            return torch.logsumexp(self.weights.log() + log_n, dim=1)
        log_uniform = -math.log(self.num_modes * self.cell ** 2)
        on = self._cell_index(x) >= 0
        return torch.where(on, log_uniform, OFF_SUPPORT_LOG_PROB).double()

    def mode_of(self, x: torch.Tensor) -> torch.Tensor:
        """Mode index (N,) int64: mixture = component at the smallest Mahalanobis distance;
        checkerboard = the square containing the point, -1 off support."""
        if self.is_mixture:
            return self._mahalanobis_sq(x).argmin(dim=1)
        return self._cell_index(x)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        """The exact EDM denoiser E[x0 | x0 + σ·n = x] of a Gaussian mixture (an analytic teacher):
        responsibilities under N(μ_k, Σ_k + σ²I), then μ_k + Σ_k(Σ_k + σ²I)⁻¹(x − μ_k).
        `class_labels` (optional) restricts the mixture to that class's components."""
        if not self.is_mixture:
            raise TypeError("the exact denoiser is implemented for Gaussian mixtures only")
        xd = x.double()
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])[:, None, None, None] ** 2
        cov = self.covs[None] + s2 * torch.eye(2, dtype=torch.float64)            # (N, K, 2, 2)
        d = xd[:, None, :] - self.means[None]                                      # (N, K, 2)
        sol = torch.linalg.solve(cov, d[..., None])[..., 0]                       # (Σ+σ²I)⁻¹(x−μ)
        logw = self.weights.log()[None] - 0.5 * ((d * sol).sum(-1) + torch.logdet(cov))
        if class_labels is not None:
            keep = self.labels[None, :] == class_labels.reshape(-1, 1).cpu()
            logw = logw.masked_fill(~keep.to(logw.device), float("-inf"))
        r = torch.softmax(logw, dim=1)                                            # (N, K)
        mean_k = self.means[None] + (self.covs[None] @ sol[..., None])[..., 0]
        return (r[..., None] * mean_k).sum(1).to(x.dtype)

    def on_support(self, x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
        """Bool (N,): mixture = within k (Mahalanobis) standard deviations of some component
        (k = 3 holds 1 - exp(-4.5) = 98.9% of a 2D Gaussian); checkerboard = inside a black square."""
        if self.is_mixture:
            return self._mahalanobis_sq(x).amin(dim=1) <= k ** 2
        return self._cell_index(x) >= 0


def eight_gaussians(radius: float = 1.0, std: float = 0.05) -> ToyDensity:
    """8 equal isotropic Gaussians evenly spaced on a circle; neighbours ~15 std apart."""
    angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return ToyDensity("8gaussians", means, covs=torch.eye(2, dtype=torch.float64).expand(8, 2, 2) * std ** 2)


def checkerboard(n: int = 4, half_width: float = 1.0) -> ToyDensity:
    """Uniform on the black squares (row + column even) of an n x n board on [-w, w]^2."""
    cell = 2 * half_width / n
    ij = [(i, j) for j in range(n) for i in range(n) if (i + j) % 2 == 0]
    centres = torch.tensor([[-half_width + (i + 0.5) * cell, -half_width + (j + 0.5) * cell] for i, j in ij], dtype=torch.float64)
    return ToyDensity("checkerboard", centres, cell=cell)


def labelled_mixture(std: float = 0.1) -> ToyDensity:
    """4 classes x 3 isotropic Gaussians on a 4 x 3 grid; class = (column + row) % 4, so every
    class is spread over the plane and a model must use the label to pick its components."""
    xs, ys = [-1.2, -0.4, 0.4, 1.2], [-0.8, 0.0, 0.8]
    means = torch.tensor([[x, y] for y in ys for x in xs], dtype=torch.float64)
    labels = torch.tensor([(i + j) % 4 for j in range(len(ys)) for i in range(len(xs))])
    return ToyDensity("labelled_mixture", means, covs=torch.eye(2, dtype=torch.float64).expand(12, 2, 2) * std ** 2, labels=labels)


def fractal(levels: int = 3, spread: float = math.radians(35), ratio: float = 0.7, target_std: float = 0.7) -> ToyDensity:
    """Two interleaved branching trees of narrow elongated Gaussians (after the autoguidance toy).

    Class 0 grows up from (-0.4, -1), class 1 grows down from (0.4, 1); each has a trunk of
    length 1 and every segment spawns two children rotated by +-`spread` and `ratio` times as
    long, for `levels` generations of branching (2 x 15 segments for levels = 3). The trees
    overlap a little near the middle. A segment of length L is a Gaussian centred on its midpoint
    with std L/4 along it and L/16 across it, weighted by L (roughly uniform mass per unit length).
    The result is centred and uniformly scaled to an overall per-axis RMS std of `target_std`.
    """
    means, covs, weights, labels = [], [], [], []

    def grow(start, angle, length, depth, label):
        u = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        rot = torch.stack([u, torch.stack([-u[1], u[0]])], dim=1)  # columns: along, across
        means.append(start + u * length / 2)
        covs.append(rot @ torch.diag(torch.tensor([length / 4, length / 16], dtype=torch.float64) ** 2) @ rot.T)
        weights.append(length)
        labels.append(label)
        if depth < levels:
            for turn in (-spread, spread):
                grow(start + u * length, angle + turn, length * ratio, depth + 1, label)

    for label, (x0, y0, angle) in enumerate([(-0.4, -1.0, math.pi / 2), (0.4, 1.0, -math.pi / 2)]):
        grow(torch.tensor([x0, y0], dtype=torch.float64), angle, 1.0, 0, label)
    means, covs, w = torch.stack(means), torch.stack(covs), torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    centre = (w[:, None] * means).sum(0)
    total_cov = (w[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0) - torch.outer(centre, centre)
    scale = target_std / math.sqrt(total_cov.trace() / 2)
    return ToyDensity("fractal", (means - centre) * scale, covs=covs * scale ** 2, weights=w, labels=labels)


def triangle(radius: float = 1.2, std: float = 0.35) -> ToyDensity:
    """3 equal isotropic Gaussians at the vertices of an equilateral triangle pointing down (angles
    −90°, 30°, 150°): rectified flow's 3-Gaussian toy scaled to the unit-circle toys, and the source of
    the mixture → mixture CAF toy (docs/methods.md §2): none of its modes sits on one of
    8gaussians', so every coupling moves mass across the plane. Each mode is wide (0.35; 6 std
    between modes) because a flow splits it among ~3 target modes: a narrow source (0.1) makes
    that split so steep that no small network learns the coupling (measured)."""
    angle = torch.tensor([-90.0, 30.0, 150.0], dtype=torch.float64) * (math.pi / 180)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return ToyDensity("triangle", means, covs=torch.eye(2, dtype=torch.float64).expand(3, 2, 2) * std ** 2)


TOY_DENSITIES = {"8gaussians": eight_gaussians, "checkerboard": checkerboard,
                 "labelled_mixture": labelled_mixture, "fractal": fractal, "triangle": triangle}


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent deterministic stream per (seed, stream): train and test never share draws."""
    return torch.Generator().manual_seed(2 * seed + stream)


def _load_toy(cfg: DataConfig) -> Dataset:
    """Toy samples. Labels: always for labelled_mixture; otherwise (component index for
    8gaussians, square index for checkerboard, tree index for fractal) only if cfg.conditional."""
    if cfg.name not in TOY_DENSITIES:
        raise ValueError(f"unknown toy distribution {cfg.name!r}; expected one of {sorted(TOY_DENSITIES)}")
    density = TOY_DENSITIES[cfg.name]()
    x, y = density.sample(cfg.n_train, _generator(cfg.split_seed, 0))
    x_test, y_test = density.sample(cfg.n_test, _generator(cfg.split_seed, 1))
    if not (cfg.conditional or cfg.name == "labelled_mixture"):
        y = y_test = None
    num_classes = density.num_classes if cfg.conditional else 0
    return Dataset(x, y, x_test, y_test, num_classes, density)

#----------------------------------------------------------------------------
# Fixed stratified split.


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices. round(test_fraction * N) test items in total, shared among
    classes in proportion to their size (largest remainder); members drawn at random by `seed`."""
    labels = np.asarray(labels)
    n = len(labels)
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / n
    take = np.floor(quota).astype(int)
    extra = np.argsort(-(quota - take), kind="stable")[: n_test - take.sum()]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)])
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _split_dataset(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig, num_classes: int) -> Dataset:
    train, test = stratified_split(y.numpy(), cfg.test_fraction, cfg.split_seed)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return Dataset(x[train], y[train], x[test], y[test], num_classes if cfg.conditional else 0, None)

#----------------------------------------------------------------------------
# scikit-learn digits.


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as `load_digits()` returns them (images (1797, 8, 8) in
    0..16, integer targets), read straight from the package's data file: importing sklearn costs
    ~1.7 s in every stage process that loads the digits."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-learn is needed for the digits data (pip install scikit-learn)")
    data = np.loadtxt(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz",
                      delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _load_digits(cfg: DataConfig) -> Dataset:
    """The 1797 8x8 digits bundled with scikit-learn, 0..16 mapped to [-1, 1], shape (1, 8, 8), or
    (cfg.color) rendered in colour, shape (3, 8, 8) (see `color_digits`).
    Labels are always returned; num_classes = 10 only if cfg.conditional."""
    images, target = digits_arrays()
    ink = torch.from_numpy(images).float().div(16).reshape(-1, 1, 8, 8)   # in [0, 1]
    x = color_digits(ink, cfg.split_seed) if cfg.color else ink
    y = torch.from_numpy(target).long()
    return _split_dataset(x.mul(2).sub(1), y, cfg, num_classes=10)


# Foreground hues of the coloured digits (RGB in [0, 1]): their luminances range from 0.11 (blue)
# to 0.89 (yellow), and the brightness factor below mixes them further.
DIGIT_PALETTE = ((1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 0.0), (0.0, 1.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 1.0))
DIGIT_BRIGHTNESS = (0.5, 1.0)


def color_digits(ink: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, 1, H, W) ink in [0, 1] -> (N, 3, H, W) RGB in [0, 1]: pixel = ink · b · c on black, with
    colour c drawn uniformly from DIGIT_PALETTE and brightness b ~ U(DIGIT_BRIGHTNESS) per image
    (numpy generator seeded by `seed`, one draw per image in order). A luminance value is reached by
    several (c, b), so the grey image does not determine the colour."""
    rng = np.random.default_rng([seed, 0xC0102])
    c = torch.tensor(DIGIT_PALETTE, dtype=torch.float32)[rng.integers(len(DIGIT_PALETTE), size=len(ink))]
    b = torch.from_numpy(rng.uniform(*DIGIT_BRIGHTNESS, size=len(ink))).float()
    return ink * (b[:, None] * c)[:, :, None, None]

#----------------------------------------------------------------------------
# Images: folder / CIFAR-10 / MNIST from a local path or an fsspec URI (s3://...).


def cache_root() -> Path:
    """fastgen's local cache: $FASTGEN_CACHE_DIR, else $XDG_CACHE_HOME/fastgen, else ~/.cache/fastgen
    (remote data here under data/; fetched artifacts and resumable checkpoints beside it)."""
    if os.environ.get("FASTGEN_CACHE_DIR"):
        return Path(os.environ["FASTGEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastgen"


def _cache_root() -> Path:
    return cache_root() / "data"


def local_root(root: str) -> Path:
    """A local directory holding the tree at `root`. Local paths are used in place; remote URIs
    (s3://...) are copied once into the cache, keyed by the URI and its file listing (names,
    sizes, ETags), so changed remote data gets a fresh copy."""
    import fsspec
    from fsspec.callbacks import TqdmCallback
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(root)
    if isinstance(fs, LocalFileSystem):
        if not Path(path).exists():
            raise FileNotFoundError(f"data root not found: {root}")
        return Path(path)
    if not fs.exists(path):
        raise FileNotFoundError(f"data root not found: {root}")
    listing = sorted((name, info.get("size"), info.get("ETag") or info.get("mtime"))
                     for name, info in fs.find(path, detail=True).items())
    key = hashlib.sha256(repr((root, listing)).encode()).hexdigest()[:16]
    dest = _cache_root() / key
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
        try:
            bar = TqdmCallback(tqdm_kwargs={"desc": f"copying {root}", "unit": "file", "mininterval": 2.0,
                                            "disable": len(listing) < 1000})
            fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True, callback=bar)
            tmp.rename(dest)  # atomic: a half-copied tree is never mistaken for a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not dest.exists():  # else a concurrent loader finished the same copy first
                raise
    return dest


def _pil_to_tensor(img, channels: int, resolution: int | None) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W): grey (1) or RGB (3); centre-cropped to a square and resized
    (Lanczos) if `resolution` is set."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if resolution is not None and img.size != (resolution, resolution):
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((resolution, resolution), Image.LANCZOS)
    a = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def _decode(images, n: int, cfg: DataConfig, where: str = "", names: list | None = None,
            out: Path | None = None) -> np.ndarray:
    """n PIL images (an iterable) into uint8 (n, C, H, W), each converted as it is read and written
    into the preallocated result, so only one decoded image is held at a time (ImageNet: 1.28M
    JPEGs); into a memory-mapped .npy file at `out` when given; a progress bar from 5 000 images.
    cfg.channels None keeps the source's: 1 if the first image is greyscale, else 3. `names` (the
    files) name an image of another size in the error."""
    it = iter(images)
    first = next(it, None)
    if first is None or n == 0:
        raise ValueError(f"no images found{where}")
    channels = cfg.channels or (1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    t = _pil_to_tensor(first, channels, cfg.resolution)
    del first  # from here on only the image being converted is held
    shape = (n, *t.shape)
    u = np.empty(shape, np.uint8) if out is None else np.lib.format.open_memmap(out, "w+", np.uint8, shape)
    u[0] = t.numpy()
    i = 1
    with tqdm(total=n, initial=1, desc=f"reading images{where}", unit="img", mininterval=2.0,
              disable=n < 5000) as bar:
        for img in it:
            if i >= n:
                raise ValueError(f"more images than labels ({n}){where}")
            t = _pil_to_tensor(img, channels, cfg.resolution)
            if t.shape != u.shape[1:]:
                what = names[i] if names is not None else f"image {i}{where}"
                first_name = names[0] if names is not None else "the first"
                raise ValueError(f"{what} is {tuple(t.shape[1:])} pixels, {first_name} {tuple(u.shape[2:])}: "
                                 "set data.resolution to resize them all")
            u[i] = t.numpy()
            i += 1
            bar.update()
    if i != n:
        raise ValueError(f"{i} images for {n} labels{where}")
    return u


def _as_float(u: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (x/127.5 − 1), a chunk at a time (u may be memory-mapped)."""
    x = torch.empty(u.shape, dtype=torch.float32)
    for i in range(0, len(u), chunk):
        part = x[i:i + chunk]
        part.copy_(torch.from_numpy(np.ascontiguousarray(u[i:i + chunk]))).div_(127.5).sub_(1)  # in place
    return x


def _to_float(images, labels, cfg: DataConfig, where: str = "",
              names: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images (an iterable, one per label) into float32 (N, C, H, W) in [-1, 1], and int64
    labels (`_decode`, then `_as_float`)."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return _as_float(_decode(images, len(y), cfg, where, names)), y


DECODE_CACHE_MIN = 5000  # image folders of at least this many images are decoded once into the cache


def _decoded_folder(paths: list[Path], cfg: DataConfig, where: str) -> np.ndarray:
    """The folder's images (in the order of `paths`) as uint8 (N, C, H, W). From DECODE_CACHE_MIN
    images, decoded once into `cache_root()/decoded/<key>.npy` and memory-mapped from then on (every
    stage, and every training worker, loads the data: decoding ImageNet's JPEGs takes hours); the key
    is the files' paths, sizes and modification times and the decoding settings, so a changed file or
    setting decodes afresh."""
    images = (_open_image(p) for p in paths)  # opened one at a time, as _decode reads them
    if len(paths) < DECODE_CACHE_MIN:
        return _decode(images, len(paths), cfg, where, paths)
    listing = [(str(p), st.st_size, st.st_mtime_ns) for p in paths for st in [os.stat(p)]]
    key = hashlib.sha256(repr(("decoded-v1", cfg.channels, cfg.resolution, listing)).encode()).hexdigest()[:16]
    dest = cache_root() / "decoded" / f"{key}.npy"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{key}-", suffix=".npy")
        os.close(fd)
        try:
            u = _decode(images, len(paths), cfg, where, paths, out=Path(tmp))
            u.flush()
            del u
            os.replace(tmp, dest)  # atomic: a half-written array is never taken for a whole one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return np.load(dest, mmap_mode="c")  # copy-on-write: the file is never changed


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout (same order as torchvision's): classes are the sorted subfolders of
    root, images the files with an image extension anywhere below each, in sorted order."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(Path(folder) / f)
                    labels.append(label)
    if not paths:
        raise FileNotFoundError(f"no images in class subfolders of {root}")
    return paths, labels, classes


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img


# Files each dataset needs under root (checked before reading anything): (reader, folder).
IMAGE_SOURCES = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "mnist": ("MNIST", "MNIST/raw")}

#----------------------------------------------------------------------------
# CIFAR-10 in its python format (cs.toronto.edu/~kriz/cifar.html), read without plain pickle.
# Each batch file is a protocol-2 pickle of a dict: data = uint8 array (N, 3072), each row the R, G
# and B planes of a 32x32 image in row-major order; labels = list of N ints in 0..9; batch_label and
# filenames (unused). batches.meta holds label_names. torchvision unpickles these with plain pickle,
# which runs whatever a crafted file asks for; this reader builds only what the real files contain.

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


def _latin1_bytes(text, encoding="latin1", errors="strict"):
    """`_codecs.encode` as pickles written by Python 3 at protocol 2 use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only to turn text into latin-1 bytes, got "
                                     f"({type(text).__name__}, {encoding!r})")
    return text.encode("latin1", errors)


def _plain_dtype(spec, align=False, copy=True):
    """`numpy.dtype` for fixed-size types only (an object dtype would let the pickle fill an array with objects)."""
    dt = np.dtype(spec, align, copy)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"object arrays are not allowed (dtype {dt})")
    return dt


def _np_reconstruct(subtype, shape, dtype):
    """numpy's array-unpickling hook, for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"only numpy.ndarray may be rebuilt, not {subtype!r}")
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct(np.ndarray, shape, dtype)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts of numbers, text, lists and plain numpy arrays; every other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,   # files written by numpy 1.x (the real ones)
               ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,  # numpy 2.x
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype,
               ("_codecs", "encode"): _latin1_bytes}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: a CIFAR-10 file holds only numpy "
                                         "arrays, numbers, text and lists")
        return self.ALLOWED[(module, name)]


def read_batch(path: Path) -> dict[str, object]:
    """One CIFAR batch or meta file as a dict with str keys (latin-1 text, as torchvision reads it).
    A file that is not such a pickle, or asks to build anything else, raises ValueError naming it."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except Exception as e:  # truncated, corrupt, or refused
        raise ValueError(f"{path}: not a CIFAR-10 python-format file: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python-format file: holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar10(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The train (5 batches) or test split under `folder` (= root/cifar-10-batches-py) as uint8
    images (N, 3, 32, 32), int64 labels (N,) and the class names, checked for shape and range."""
    meta = read_batch(folder / "batches.meta")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in meta.get("label_names", [])]
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{folder / 'batches.meta'}: no label_names list")
    xs, ys = [], []
    for name in CIFAR10_TRAIN if train else CIFAR10_TEST:
        entry = read_batch(folder / name)
        data, labels = entry.get("data"), entry.get("labels")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            what = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{folder / name}: data must be a uint8 array (N, 3072), got {what}")
        y = np.asarray(labels if isinstance(labels, list) else [], dtype=np.int64)
        if len(y) != len(data) or (len(y) and not (0 <= y.min() and y.max() < len(names))):
            raise ValueError(f"{folder / name}: labels must be a list of {len(data)} ints in 0..{len(names) - 1}")
        xs.append(data)
        ys.append(y)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys), names


def _uint8_to_float(x: np.ndarray, labels: np.ndarray, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (N, 3, H, W) -> the same float32 tensors `_to_float` makes of the PIL images
    (directly when no conversion is asked for; through PIL to grey or resize)."""
    if cfg.channels in (None, 3) and cfg.resolution in (None, x.shape[-1]) and x.shape[-1] == x.shape[-2]:
        return torch.from_numpy(x).float().div(127.5).sub(1), torch.from_numpy(labels)
    from PIL import Image

    return _to_float((Image.fromarray(a) for a in x.transpose(0, 2, 3, 1)), labels, cfg)


def _load_images(cfg: DataConfig) -> Dataset:
    """An ImageFolder tree (root/<class>/*.png; fixed stratified split), or CIFAR-10 / MNIST
    in torchvision's layout under root (their own train/test files)."""
    if cfg.root is None:
        raise ValueError("data.root must be set for kind='images'")
    if cfg.name != "folder" and cfg.name not in IMAGE_SOURCES:
        raise ValueError(f"unknown image dataset {cfg.name!r}; expected folder | cifar10 | mnist")
    root = local_root(cfg.root)
    if cfg.name == "folder":
        paths, labels, classes = scan_folder(root)
        labels = np.asarray(labels, dtype=np.int64)
        # decoded in split order, train first: the two splits are views of one array, not copies of it
        train, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
        order = np.concatenate([train, test])
        x = _as_float(_decoded_folder([paths[i] for i in order], cfg, f" under {cfg.root}"))
        y, n = torch.from_numpy(labels[order]), len(train)
        return Dataset(x[:n], y[:n], x[n:], y[n:], len(classes) if cfg.conditional else 0, None)
    cls_name, needed = IMAGE_SOURCES[cfg.name]
    if not (root / needed).exists():
        raise FileNotFoundError(f"{cfg.name} files not found: expected {needed} under {cfg.root}")
    if cfg.name == "cifar10":
        splits = [_uint8_to_float(*read_cifar10(root / needed, train)[:2], cfg) for train in (True, False)]
    else:  # MNIST's raw files are plain byte arrays (no pickle): torchvision reads them
        import torchvision

        splits = []
        for train in (True, False):
            ds = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=False)
            splits.append(_to_float((img for img, _ in ds), ds.targets, cfg))
    (x, y), (x_test, y_test) = splits
    return Dataset(x, y, x_test, y_test, 10 if cfg.conditional else 0, None)
