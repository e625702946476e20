"""CIFAR-10's python format read without plain pickle (fastgen_core/data.py `read_batch`): the same
tensors as an independent decoding of the documented layout and as torchvision, crafted files
refused with the file named, local and s3:// roots."""
from __future__ import annotations

import os
import pickle
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen_core.config import DataConfig
from fastgen_core.data import load_data, read_batch
from image_data import LABEL_NAMES, cifar10_images, write_cifar10


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("c10") / "root", n_train=60, n_test=20, seed=3)


def cfg(root, **kw) -> DataConfig:
    return DataConfig(kind="images", name="cifar10", root=str(root), **kw)


def test_same_tensors_as_the_documented_layout(cifar):
    ds = load_data(cfg(cifar, conditional=True))
    for x, y, (want, labels) in [(ds.x, ds.y, cifar10_images(60, 3)), (ds.x_test, ds.y_test, cifar10_images(20, 4))]:
        # the images the writer drew (HWC uint8), mapped to [-1, 1] and CHW here, not by the reader
        assert torch.equal(x, torch.from_numpy(want.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2))
        assert torch.equal(y, torch.from_numpy(labels))
    assert ds.num_classes == 10 and load_data(cfg(cifar)).num_classes == 0
    # what a students group knows before loading (its default contiguous partition needs it)
    from stages.students import num_classes

    assert num_classes(cfg(cifar, conditional=True)) == ds.num_classes and num_classes(cfg(cifar)) == 0


def test_same_tensors_as_torchvision(cifar):
    """torchvision's CIFAR10 on the same files, with only its md5 check bypassed (test-made files)."""
    import torchvision

    with mock.patch.object(torchvision.datasets.CIFAR10, "_check_integrity", return_value=True), \
            mock.patch("torchvision.datasets.cifar.check_integrity", return_value=True):
        tv = [torchvision.datasets.CIFAR10(str(cifar), train=t) for t in (True, False)]
    ds = load_data(cfg(cifar))
    for x, y, t in [(ds.x, ds.y, tv[0]), (ds.x_test, ds.y_test, tv[1])]:
        assert torch.equal(x, torch.from_numpy(t.data).permute(0, 3, 1, 2).float() / 127.5 - 1)
        assert y.tolist() == t.targets
    assert tv[0].classes == list(LABEL_NAMES)


def test_resize_and_grey_go_through_pil(cifar):
    want, _ = cifar10_images(60, 3)
    small = load_data(cfg(cifar, resolution=16)).x
    ref = np.stack([np.asarray(Image.fromarray(a).resize((16, 16), Image.LANCZOS)) for a in want])
    assert torch.equal(small, torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 127.5 - 1)
    grey = load_data(cfg(cifar, channels=1)).x
    ref = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in want])
    assert torch.equal(grey, torch.from_numpy(ref)[:, None].float() / 127.5 - 1)


def test_python3_pickles_of_the_same_dicts_read_the_same(cifar, tmp_path):
    """A copy re-pickled by Python 3 (protocol 2 stores bytes through _codecs.encode; protocol 4 does
    not) loads to the same tensors."""
    src = cifar / "cifar-10-batches-py"
    for protocol in (2, 4):
        dst = tmp_path / f"p{protocol}" / "cifar-10-batches-py"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            (dst / f.name).write_bytes(pickle.dumps(d, protocol=protocol))
        a, b = load_data(cfg(cifar)), load_data(cfg(dst.parent))
        assert torch.equal(a.x, b.x) and torch.equal(a.y_test, b.y_test)


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _replace_batch(tmp_path, cifar, name: str, payload: bytes):
    root = tmp_path / "crafted"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for f in (cifar / "cifar-10-batches-py").iterdir():
        (root / "cifar-10-batches-py" / f.name).write_bytes(payload if f.name == name else f.read_bytes())
    return root


def test_crafted_global_is_refused_and_never_runs(cifar, tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"data": _RunsCode(marker), "labels": []}, protocol=2)
    with open(tmp_path / "check", "wb") as f:  # plain pickle would run it: the payload is live
        f.write(payload)
    pickle.loads(payload)
    assert marker.exists()
    marker.rmdir()
    root = _replace_batch(tmp_path, cifar, "data_batch_3", payload)
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 python-format file: refusing global "
                                         r"\w+\.mkdir"):
        load_data(cfg(root))
    assert not marker.exists()


@pytest.mark.parametrize("case", ["object_array", "codecs", "wrong_shape", "bad_label", "not_a_dict", "truncated"])
def test_malformed_files_name_the_file(cifar, tmp_path, case):
    good = (cifar / "cifar-10-batches-py" / "test_batch").read_bytes()
    payload, match = {
        "object_array": (pickle.dumps({"data": np.array([None, 1], dtype=object), "labels": [0]}, protocol=2),
                         "object arrays are not allowed"),
        "codecs": (b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x03\x00\x00\x00hex\x86R.",
                   "only to turn text into latin-1 bytes"),
        "wrong_shape": (pickle.dumps({"data": np.zeros((2, 3, 32, 32), np.uint8), "labels": [0, 1]}, protocol=2),
                        r"data must be a uint8 array \(N, 3072\), got uint8 array \(2, 3, 32, 32\)"),
        "bad_label": (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, protocol=2),
                      "labels must be a list of 2 ints in 0..9"),
        "not_a_dict": (pickle.dumps([1, 2], protocol=2), "holds a list, not a dict"),
        "truncated": (good[: len(good) // 2], "not a CIFAR-10 python-format file"),
    }[case]
    root = _replace_batch(tmp_path, cifar, "test_batch", payload)
    with pytest.raises(ValueError, match="test_batch: .*" + match):
        load_data(cfg(root))


def test_read_batch_keys_are_text(cifar):
    d = read_batch(cifar / "cifar-10-batches-py" / "data_batch_1")
    assert list(d) == ["batch_label", "labels", "data", "filenames"] and d["batch_label"] == "training batch 1 of 5"


def test_s3_root_reads_the_same(cifar, tmp_path, monkeypatch):
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION":
                     "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}", "FASTGEN_CACHE_DIR": str(tmp_path)}.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        # moto's in-process servers share one store per process: a bucket name no other test uses
        # (tests/test_data.py makes "bucket" on its own server in the same worker process)
        fs.mkdir("cifar-bucket")
        fs.put(str(cifar) + "/", "cifar-bucket/cifar10/", recursive=True)
        remote, local = load_data(cfg("s3://cifar-bucket/cifar10", conditional=True)), load_data(cfg(cifar, conditional=True))
        assert torch.equal(remote.x, local.x) and torch.equal(remote.y_test, local.y_test)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


# ----------------------------------------------------------------------------- 8-bit RGB through analog bits
# params/cifar10_bits.yaml: the bits method at 256 levels reads images through the ordinary image
# loaders; these check that what it trains on is exactly the files' 8-bit values.

def _bits_method(ds):
    from fastgen_core.config import NetworkConfig
    from fastgen_core.methods import bits as B
    from fastgen_core.methods.base import Context
    from fastgen_core.noise import VPCosine

    net = NetworkConfig(arch="unet", width=8, depth=1, channel_mult=[1, 2], emb_dim=16)
    return B.Method(B.Config(levels=256, code="binary", b_scale=0.5, self_cond=True), Context(ds, VPCosine(), net))


def _msb_first_bits(u8_chw: torch.Tensor, b_scale: float) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 24, H, W): channel c's bits in channels 8c … 8c + 7, most significant
    first, each ±b_scale (docs/methods.md §7), written with shifts independently of fastgen_core.bits."""
    shifts = torch.arange(7, -1, -1).reshape(1, 1, 8, 1, 1)
    b = (u8_chw.long().unsqueeze(2) >> shifts) & 1
    return ((2 * b - 1) * b_scale).float().flatten(1, 2)


def test_cifar10_bytes_are_what_the_bits_method_trains_on(cifar):
    """CIFAR-10 at 256 levels: the method's values are the file's uint8 bytes (not rounded from
    anything else), 24 analog bits a pixel in the documented layout, and decoding gives back the
    loaded images; one training loss runs on the conv net built for (24, 32, 32) + 24 channels."""
    from fastgen_core.bits import dequantize

    ds = load_data(cfg(cifar, conditional=True))
    want = torch.from_numpy(cifar10_images(60, 3)[0]).permute(0, 3, 1, 2)  # the written bytes, CHW
    m = _bits_method(ds)
    v = m.tensors()["v"]
    assert v.dtype == torch.uint8 and torch.equal(v, want)
    a = m.coder.encode(v)
    assert m.shape == (24, 32, 32) and torch.equal(a, _msb_first_bits(want, 0.5))
    assert torch.allclose(dequantize(m.coder.decode(a), 256), ds.x, atol=1e-6, rtol=0)
    assert m.nets["net"].inp.in_channels == 48  # 24 bits + 24 self-conditioning channels
    torch.manual_seed(0)
    loss, _ = m.loss("main", {"v": v[:4], "y": ds.y[:4]}, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_image_folder_8bit_rgb_reaches_the_bits_method_exactly(tmp_path):
    """An image folder of 8-bit RGB PNGs (random ones and two ramps spanning 0-255): each training
    image the method sees is one written PNG's bytes exactly."""
    g = np.random.default_rng(5)
    imgs = {}
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(4):
            arr = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            if c == "a" and i == 0:
                arr = np.arange(192, dtype=np.uint8).reshape(8, 8, 3) + np.uint8(64)  # 64 … 255
            if c == "a" and i == 1:
                arr = np.arange(192, dtype=np.uint8).reshape(8, 8, 3)  # 0 … 191
            Image.fromarray(arr).save(tmp_path / "f" / c / f"{i}.png")
            imgs[(c, i)] = arr
    ds = load_data(DataConfig(kind="images", name="folder", root=str(tmp_path / "f"), test_fraction=0.25))
    v = _bits_method(ds).tensors()["v"]
    got = {bytes(x.permute(1, 2, 0).contiguous().numpy()) for x in v}
    assert v.dtype == torch.uint8 and v.shape[1:] == (3, 8, 8) and len(v) == len(ds.x)
    assert got <= {a.tobytes() for a in imgs.values()} and len(got) == len(v)
