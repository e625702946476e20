"""The synthetic shapes image folder (fastgen_core/shapes.py): deterministic, loadable through the
folder loader, made of four measurably different shapes, written atomically; and the message a
user gets when the recipe's folder is missing."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fastgen_core.config import DataConfig
from fastgen_core.data import load_data
from fastgen_core.shapes import CLASSES, MANIFEST, write_shapes_folder

ROOT = Path(__file__).resolve().parent.parent
N = 40  # images per class in these tests


def _pixels(root: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("shapes") / "shapes16", n_per_class=N, seed=0)


def test_writer_is_deterministic_in_its_seed(folder, tmp_path):
    again = _pixels(write_shapes_folder(tmp_path / "a", n_per_class=N, seed=0))
    first = _pixels(folder)
    assert list(first) == list(again) == [f"{c}/{i:05d}.png" for c in CLASSES for i in range(N)]
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other = _pixels(write_shapes_folder(tmp_path / "b", n_per_class=N, seed=1))
    assert sum(np.array_equal(first[k], other[k]) for k in first) == 0


def test_folder_loads_through_the_folder_loader(folder):
    ds = load_data(DataConfig(kind="images", name="folder", root=str(folder), conditional=True))
    assert ds.num_classes == 4 and ds.shape == (3, 16, 16)
    assert len(ds.x) + len(ds.x_test) == 4 * N
    assert torch.bincount(torch.cat([ds.y, ds.y_test])).tolist() == [N] * 4
    assert ds.x.dtype == torch.float32 and ds.x.min() == -1.0 and ds.x.max() <= 1.0
    x = torch.cat([ds.x, ds.x_test])
    assert (x.amax(dim=(1, 2, 3)) > 0.1).all()             # every image has a visible shape
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    assert (border == -1).all()                             # ... fully inside, on black


def _stats(img: np.ndarray) -> np.ndarray:
    """Geometric statistics of the shape's coverage m (brightest channel, normalised): fill of its
    bounding box, centroid height in the box (0 top .. 1 bottom), mass in the box's four corner
    ninths, and mass in its centre ninth (all relative to the total)."""
    m = img.max(axis=2).astype(np.float64)
    m /= m.max()
    ys, xs = np.nonzero(m > 0.5)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    b = m[y0:y1, x0:x1]
    h, w = b.shape
    rows, cols = (np.arange(h)[:, None] + 0.5) / h, (np.arange(w)[None, :] + 0.5) / w
    edge_r, edge_c = (rows < 1 / 3) | (rows > 2 / 3), (cols < 1 / 3) | (cols > 2 / 3)
    total = b.sum()
    corners, centre = b[edge_r & edge_c].sum() / total, b[~edge_r & ~edge_c].sum() / total
    return np.array([total / (h * w), (b * rows).sum() / total, corners, centre])


def test_classes_differ_measurably(folder):
    """Linear discriminant analysis (class means, pooled covariance) on four geometric statistics,
    fitted on half of the images, names the shape of the other half: the classes are the shapes
    their folders say."""
    px = _pixels(folder)
    feats = {c: np.stack([_stats(px[f"{c}/{i:05d}.png"]) for i in range(N)]) for c in CLASSES}
    centroids = np.stack([feats[c][: N // 2].mean(0) for c in CLASSES])
    precision = np.linalg.inv(sum(np.cov(feats[c][: N // 2].T) for c in CLASSES) / len(CLASSES))
    d = np.concatenate([feats[c][N // 2:] for c in CLASSES])[:, None] - centroids[None]
    pred = np.einsum("nki,ij,nkj->nk", d, precision, d).argmin(1)
    assert (pred == np.repeat(np.arange(4), N - N // 2)).mean() >= 0.95
    # the expected shapes: a square fills its box, a disc π/4 of it, a triangle half of it (mass
    # low in the box), a cross has empty corners
    fill = {c: feats[c][:, 0].mean() for c in CLASSES}
    assert fill["square"] > 0.85 and 0.65 < fill["disc"] < 0.85 and fill["triangle"] < 0.65
    assert feats["triangle"][:, 1].mean() > 0.55 > feats["disc"][:, 1].mean() > 0.45
    assert feats["cross"][:, 2].mean() < 0.5 * feats["square"][:, 2].mean()


def test_each_image_is_one_colour(folder):
    """Pixels are coverage · colour: the (pixels, RGB) matrix of an image has rank one (up to
    8-bit rounding), and colours vary across images."""
    px = _pixels(folder)
    ratios, hues = [], set()
    for a in px.values():
        rgb = a.reshape(-1, 3).astype(np.float64)
        s = np.linalg.svd(rgb, compute_uv=False)
        ratios.append(s[1] / s[0])
        brightest = rgb[rgb.sum(1).argmax()]
        hues.add(tuple(np.round(brightest / brightest.max(), 1)))
    assert max(ratios) < 0.02
    assert len(hues) >= 6


def test_interrupted_write_leaves_no_complete_looking_folder(tmp_path):
    """A writer killed (SIGKILL: no cleanup runs) after 10 images leaves root absent and only a
    hidden partial folder beside it; a later write ignores that and completes."""
    root = tmp_path / "shapes16"
    script = textwrap.dedent(f"""
        import os, signal
        import fastgen_core.shapes as S
        real, n = S._write_png, [0]
        def write(path, a):
            n[0] += 1
            if n[0] > 10:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, a)
        S._write_png = write
        S.write_shapes_folder({str(root)!r}, n_per_class=20)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert not root.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".shapes16.partial-")
    assert len(list((tmp_path / left[0]).rglob("*.png"))) == 10
    write_shapes_folder(root, n_per_class=20)
    assert len(list(root.rglob("*.png"))) == 80 and (root / MANIFEST).exists()


def test_failed_write_cleans_up_and_existing_roots_are_checked(tmp_path, monkeypatch):
    import fastgen_core.shapes as S

    def boom(path, a):
        raise OSError("disk full")

    monkeypatch.setattr(S, "_write_png", boom)
    with pytest.raises(OSError, match="disk full"):
        write_shapes_folder(tmp_path / "s", n_per_class=2)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_shapes_folder(tmp_path / "s", n_per_class=2)
    assert write_shapes_folder(tmp_path / "s", n_per_class=2) == tmp_path / "s"  # same settings: as is
    with pytest.raises(FileExistsError, match="does not hold the shapes folder"):
        write_shapes_folder(tmp_path / "s", n_per_class=3)
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="no shapes.json"):
        write_shapes_folder(tmp_path / "mine")


def test_missing_folder_names_the_command_that_makes_it(tmp_path, capsys):
    """The shipped recipe with its folder missing: `stages.run` exits 2 with one line naming the
    file, the field and the command that writes the folder."""
    from stages.runtime import main

    raw = yaml.safe_load((ROOT / "params" / "shapes_cd.yaml").read_text())
    missing = tmp_path / "nowhere" / "shapes16"
    raw["data"]["root"] = str(missing)
    p = tmp_path / "shapes_cd.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main([str(p), "teacher"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"{p}: data.root: data path does not exist: {missing} (an image folder root/<class>/*.png; "
                     f"`fastgen shapes {missing}` writes the synthetic shapes folder of params/shapes_cd.yaml there)"]


def test_project_folder_is_the_writers_output(tmp_path):
    """data/shapes16 (params/shapes_cd.yaml's root; recipes are validated with their data root,
    so it is kept in the repository) is exactly what `fastgen shapes data/shapes16` writes."""
    kept = ROOT / "data" / "shapes16"
    assert kept.is_dir(), "data/shapes16 is missing: run `fastgen shapes data/shapes16`"
    fresh = write_shapes_folder(tmp_path / "shapes16")
    assert (kept / MANIFEST).read_text() == (fresh / MANIFEST).read_text()
    a, b = _pixels(kept), _pixels(fresh)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_cli_writes_the_folder_and_refuses_another_one(tmp_path, capsys):
    from stages.cli import main

    assert main(["shapes", str(tmp_path / "s"), "--n-per-class", "3", "--seed", "2"]) == 0
    assert _pixels(tmp_path / "s").keys() == _pixels(write_shapes_folder(tmp_path / "t", 3, seed=2)).keys()
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(tmp_path / "s").values(),
                                                     _pixels(tmp_path / "t").values()))
    capsys.readouterr()
    assert main(["shapes", str(tmp_path / "s"), "--n-per-class", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastgen shapes: {tmp_path / 's'} exists but does not hold")
