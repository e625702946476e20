"""Tests for fastgen_core.data: toy densities, digits, image folders (local and s3://)."""
import math
import os
import shutil

import numpy as np
import pytest
import torch

from fastgen_core.config import DataConfig
from fastgen_core.data import OFF_SUPPORT_LOG_PROB, load_data, stratified_split

TOYS = ["8gaussians", "checkerboard", "labelled_mixture", "fractal"]


def gaussian_pdf(x, mean, cov):
    """The textbook 2D normal density, written out independently of the library."""
    d = x.double().numpy() - mean.numpy()
    q = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov.numpy()), d)
    return np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(cov.numpy())))


def toy(name, **kw):
    return load_data(DataConfig(kind="toy", name=name, n_train=4000, n_test=2000, **kw))

#----------------------------------------------------------------------------
# Toy data.


@pytest.mark.parametrize("name", TOYS)
def test_toy_deterministic_shapes_and_scale(name):
    a, b, c = toy(name, split_seed=3), toy(name, split_seed=3), toy(name, split_seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x, c.x)
    assert not torch.equal(a.x[:2000], a.x_test)  # train and test are different draws
    assert a.x.shape == (4000, 2) and a.x_test.shape == (2000, 2) and a.x.dtype == torch.float32
    assert a.shape == (2,) and not a.is_image and a.density.name == name
    std = a.x.std(dim=0)
    assert ((std > 0.5) & (std < 1.0)).all(), std


@pytest.mark.parametrize("name", TOYS)
def test_toy_labels(name):
    uncond, cond = toy(name), toy(name, conditional=True)
    assert uncond.num_classes == 0
    assert cond.num_classes == {"8gaussians": 8, "checkerboard": 8, "labelled_mixture": 4, "fractal": 2}[name]
    assert cond.y.dtype == torch.int64 and cond.y.shape == (4000,) and cond.y_test.shape == (2000,)
    assert set(cond.y.tolist()) == set(range(cond.num_classes))
    assert (uncond.y is None) == (name != "labelled_mixture")  # labelled_mixture always has labels
    d = cond.density
    if d.is_mixture:  # every sample lies closest to a component of its own class (mostly)
        assert (d.labels[d.mode_of(cond.x)] == cond.y).float().mean() > 0.95


def test_8gaussians_log_prob_matches_formula_and_integrates_to_one():
    d = toy("8gaussians").density
    pts = torch.tensor([[1.0, 0.0], [0.7, 0.72], [0.0, 0.0], [1.03, -0.02]])
    manual = sum(gaussian_pdf(pts, m, c) for m, c in zip(d.means, d.covs)) / 8
    assert np.allclose(d.log_prob(pts).exp().numpy(), manual, rtol=1e-6)
    step = 0.005  # a tenth of the component std
    g = torch.arange(-1.5, 1.5, step, dtype=torch.float64) + step / 2
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    assert abs(d.log_prob(grid).exp().sum().item() * step ** 2 - 1) < 1e-3


@pytest.mark.parametrize("name", ["labelled_mixture", "fractal"])
def test_anisotropic_mixture_log_prob_matches_formula(name):
    d = toy(name).density
    pts, _ = d.sample(50, torch.Generator().manual_seed(0))
    manual = sum(w.item() * gaussian_pdf(pts, m, c) for w, m, c in zip(d.weights, d.means, d.covs))
    assert np.allclose(d.log_prob(pts).exp().numpy(), manual, rtol=1e-6)
    assert d.weights.sum().item() == pytest.approx(1.0)


def test_checkerboard_density():
    d = toy("checkerboard").density
    assert d.covs is None and d.stds is None and d.num_modes == 8
    pts = torch.tensor([[-0.9, -0.9], [-0.4, -0.9], [0.1, 0.1], [3.0, 3.0]])  # black, white, black, outside
    assert d.log_prob(pts).tolist() == pytest.approx([-math.log(2.0), OFF_SUPPORT_LOG_PROB, -math.log(2.0), OFF_SUPPORT_LOG_PROB])
    assert d.on_support(pts).tolist() == [True, False, True, False]
    assert d.mode_of(pts)[[1, 3]].tolist() == [-1, -1]
    assert d.mode_of(d.means).tolist() == list(range(8))
    x, _ = d.sample(20000, torch.Generator().manual_seed(0))
    assert d.on_support(x).all() and x.abs().max() <= 1
    assert torch.bincount(d.mode_of(x), minlength=8).min() > 2200  # ~2500 per square


@pytest.mark.parametrize("name", ["8gaussians", "labelled_mixture", "fractal"])
def test_mixture_support_and_modes(name):
    d = toy(name).density
    x, _ = d.sample(20000, torch.Generator().manual_seed(1))
    # 3 Mahalanobis stds hold 1 - exp(-4.5) = 98.9% of a 2D Gaussian; overlaps add a little
    assert d.on_support(x).float().mean() > 0.985
    far = torch.tensor([[5.0, 5.0], [-4.0, 0.0], [0.0, 6.0]])
    assert not d.on_support(far).any()
    assert torch.equal(d.mode_of(d.means.float()), torch.arange(d.num_modes))
    assert d.on_support(d.means).all()


def test_8gaussians_geometry():
    d = toy("8gaussians").density
    assert d.num_modes == 8 and d.means.norm(dim=1).allclose(torch.ones(8, dtype=torch.float64))
    assert d.stds.allclose(torch.full((8, 2), 0.05, dtype=torch.float64))
    assert not d.on_support(torch.zeros(1, 2)).any()  # the centre is empty

#----------------------------------------------------------------------------
# Digits.


def test_digits_split_and_range():
    ds = load_data(DataConfig(kind="digits"))
    assert ds.x.shape == (1400, 1, 8, 8) and ds.x_test.shape == (397, 1, 8, 8)
    assert ds.is_image and ds.shape == (1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.x.min() == -1 and ds.x.max() == 1 and ds.num_classes == 0 and ds.density is None
    assert ds.y.dtype == torch.int64 and len(ds.y_test) == 397
    train_counts, test_counts = torch.bincount(ds.y, minlength=10), torch.bincount(ds.y_test, minlength=10)
    expected = (train_counts + test_counts).double() * 397 / 1797
    assert ((test_counts - expected).abs() <= 1).all()  # stratified
    # deterministic, seed-dependent, disjoint
    again, other = load_data(DataConfig(kind="digits")), load_data(DataConfig(kind="digits", split_seed=1))
    assert torch.equal(ds.x_test, again.x_test) and not torch.equal(ds.x_test, other.x_test)
    assert load_data(DataConfig(kind="digits", conditional=True)).num_classes == 10


def test_digits_read_from_the_data_file_equal_sklearns_loader():
    """digits_arrays reads scikit-learn's data file without importing sklearn; it must give exactly
    what sklearn's own loader gives."""
    from sklearn.datasets import load_digits

    from fastgen_core.data import digits_arrays

    images, target = digits_arrays()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target)


def test_stratified_split_partitions():
    labels = np.repeat(np.arange(3), [10, 20, 70])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(test) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert np.bincount(labels[test]).tolist() == [2, 4, 14]

#----------------------------------------------------------------------------
# Image folders.

COLOURS = {"apple": (255, 0, 0), "sky": (0, 0, 255), "snow": (255, 255, 255)}


def write_folder(root, per_class=6):
    from PIL import Image

    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), colour).save(root / name / f"{i}.png")
    return root


def check_folder(ds, channels=3, res=8):
    assert ds.x.shape[1:] == (channels, res, res) and ds.x.dtype == torch.float32
    assert len(ds.x) + len(ds.x_test) == 18 and len(ds.x_test) == 4  # round(0.221 * 18)
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert ds.num_classes == 3
    # ImageFolder sorts class names: apple=0 (red), sky=1 (blue), snow=2 (white)
    x, y = torch.cat([ds.x, ds.x_test]), torch.cat([ds.y, ds.y_test])
    for label, colour in enumerate(COLOURS.values()):
        mean = x[y == label].mean(dim=(0, 2, 3))
        want = torch.tensor(colour, dtype=torch.float32) / 127.5 - 1
        if channels == 1:
            want = (torch.tensor(colour, dtype=torch.float32) @ torch.tensor([0.299, 0.587, 0.114]) / 127.5 - 1)[None]
        assert torch.allclose(mean, want, atol=0.02), (label, mean, want)


def test_image_folder_local(tmp_path):
    root = write_folder(tmp_path / "imgs")
    cfg = DataConfig(kind="images", name="folder", root=str(root), resolution=8, conditional=True)
    ds = load_data(cfg)
    check_folder(ds)
    assert torch.equal(ds.x, load_data(cfg).x)
    grey = load_data(cfg.model_copy(update={"channels": 1}))
    check_folder(grey, channels=1)
    native = load_data(cfg.model_copy(update={"resolution": None, "conditional": False}))
    assert native.x.shape[1:] == (3, 10, 12) and native.num_classes == 0


def test_image_folder_is_read_one_image_at_a_time(tmp_path):
    """Each image is converted as it is read: never more than the image being converted is alive
    (reading 1.28M ImageNet JPEGs into a list first would need ~0.7 TB), and the result is the
    same as converting the whole list at once (the former way)."""
    import weakref

    from PIL import Image

    from fastgen_core.data import _pil_to_tensor, _to_float

    alive, most, made = [0], [0], []

    def gone():
        alive[0] -= 1

    def images():
        for i in range(40):  # freed by reference counting as soon as dropped (no gc.collect(): ~1 s each in a loaded process)
            most[0] = max(most[0], alive[0])
            img = Image.new("RGB", (24, 18), (6 * i, 255 - 6 * i, 3 * i))
            alive[0] += 1
            weakref.finalize(img, gone)
            yield img

    cfg = DataConfig(kind="images", name="folder", root=str(tmp_path), resolution=8)
    x, y = _to_float(images(), list(range(40)), cfg)
    assert most[0] <= 1, most[0]  # the former way (a list first): 39
    for i in range(40):
        made.append(_pil_to_tensor(Image.new("RGB", (24, 18), (6 * i, 255 - 6 * i, 3 * i)), 3, 8))
    assert torch.equal(x, torch.stack(made).float().div(127.5).sub(1)) and torch.equal(y, torch.arange(40))
    # images of other sizes without data.resolution: the file that differs, by name
    root = write_folder(tmp_path / "imgs")
    odd = sorted((root / "sky").iterdir())[1]
    Image.new("RGB", (7, 5)).save(odd)
    with pytest.raises(ValueError, match=f"{odd} is \\(5, 7\\) pixels, .* \\(10, 12\\): set data.resolution"):
        load_data(DataConfig(kind="images", name="folder", root=str(root)))


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A moto S3 server on a free local port, with the AWS environment pointing at it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                       "FASTGEN_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("bucket")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_image_folder_s3(s3, tmp_path):
    root = write_folder(tmp_path / "imgs")
    s3.put(str(root) + "/", "bucket/data/imgs/", recursive=True)
    assert len(s3.find("bucket/data/imgs")) == 18
    cfg = DataConfig(kind="images", name="folder", root="s3://bucket/data/imgs", resolution=8, conditional=True)
    ds = load_data(cfg)
    check_folder(ds)
    local = load_data(cfg.model_copy(update={"root": str(root)}))
    assert torch.equal(ds.x, local.x) and torch.equal(ds.y_test, local.y_test)
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1  # cached once, reused
    assert torch.equal(load_data(cfg).x, ds.x)
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1
    with pytest.raises(FileNotFoundError, match="s3://bucket/nope"):
        load_data(cfg.model_copy(update={"root": "s3://bucket/nope"}))


def test_missing_paths_raise(tmp_path):
    missing = str(tmp_path / "does-not-exist")
    for name in ["folder", "cifar10", "mnist"]:
        with pytest.raises(FileNotFoundError, match="does-not-exist"):
            load_data(DataConfig(kind="images", name=name, root=missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_data(DataConfig(kind="images", name="cifar10", root=str(tmp_path / "empty")))


def test_a_large_image_folder_is_decoded_once_into_the_cache(tmp_path, monkeypatch):
    """From DECODE_CACHE_MIN images (5 000; lowered to 1 here) a folder is decoded once into the
    cache and memory-mapped by every later load (each stage and each training worker loads the data):
    the splits equal the former whole decode followed by `_split_dataset`, and share one array instead
    of copying it; a later load opens no image; a rewritten image decodes afresh; a folder that fails
    to decode leaves nothing in the cache."""
    from PIL import Image

    import fastgen_core.data as D

    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    root, rng = tmp_path / "imgs", np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    cfg = DataConfig(kind="images", name="folder", root=str(root), conditional=True, test_fraction=0.3)
    paths, labels, _ = D.scan_folder(root)
    x, y = D._to_float((D._open_image(p) for p in paths), labels, cfg)           # the former way
    want = D._split_dataset(x, y, cfg, num_classes=3)

    monkeypatch.setattr(D, "DECODE_CACHE_MIN", 1)
    ds = D.load_data(cfg)
    for a, b in [(ds.x, want.x), (ds.y, want.y), (ds.x_test, want.x_test), (ds.y_test, want.y_test)]:
        assert torch.equal(a, b)
    assert ds.x.untyped_storage().data_ptr() == ds.x_test.untyped_storage().data_ptr()  # views, no copy
    cached = list((tmp_path / "cache" / "decoded").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npy"

    opened = []
    real_open = D._open_image
    monkeypatch.setattr(D, "_open_image", lambda p: (opened.append(p), real_open(p))[1])
    again = D.load_data(cfg)
    assert opened == [] and torch.equal(again.x, ds.x) and torch.equal(again.x_test, ds.x_test)

    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "b" / "4.png")       # changed on disk
    os.utime(root / "b" / "4.png", ns=(1, 1))
    changed = D.load_data(cfg)
    assert len(opened) == 27 and not torch.equal(torch.cat([changed.x, changed.x_test]), torch.cat([ds.x, ds.x_test]))

    Image.new("RGB", (5, 7)).save(root / "c" / "9.png")                              # fails to decode
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ValueError, match="9.png is \\(7, 5\\) pixels"):
        D.load_data(cfg)
    assert list((tmp_path / "cache" / "decoded").iterdir()) == []
