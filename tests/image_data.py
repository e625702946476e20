"""Small image datasets that tests write to disk in the real on-disk formats.

`write_cifar10` writes CIFAR-10's python format (cs.toronto.edu/~kriz/cifar.html) byte for byte the
way the real files are built: Python 2 cPickle protocol-2 dicts whose keys and text are byte
strings (read as str with encoding="latin1", as torchvision does, or bytes with encoding="bytes"),
and whose `data` is a numpy array pickled through numpy.core.multiarray._reconstruct with a uint8
(N, 3072) buffer: each row the R, G, B planes of a 32x32 image, row-major. Python 3's pickler cannot
write such files (it stores bytes through _codecs.encode at protocol 2), so the opcodes are written
here directly.

The images have structure a shrunk run can learn from: class c is a disc (even c) or a square (odd c)
of hue c/10 at a random place and size on a dark background of random brightness, plus a little noise.
"""
from __future__ import annotations

import colorsys
import struct
from pathlib import Path

import numpy as np

LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_TRAIN_BATCHES = 5

#----------------------------------------------------------------------------
# Images.


def cifar10_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images uint8 (n, 32, 32, 3) (HWC) and labels int64 (n,), cycling through the 10 classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    yy, xx = np.mgrid[0:32, 0:32]
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        colour = np.array(colorsys.hsv_to_rgb(c / 10, 0.9, 1.0)) * 255
        cy, cx = rng.uniform(10, 22, size=2)
        r = rng.uniform(5, 9)
        mask = (np.hypot(yy - cy, xx - cx) < r) if c % 2 == 0 else (np.maximum(abs(yy - cy), abs(xx - cx)) < r * 0.8)
        img = np.full((32, 32, 3), rng.uniform(10, 60))
        img[mask] = colour
        out[i] = np.clip(img + rng.normal(0, 4, size=img.shape), 0, 255).astype(np.uint8)
    return out, labels.astype(np.int64)

#----------------------------------------------------------------------------
# Python 2 cPickle protocol 2, the opcodes the real files use (see pickletools for their meaning).


def _str(b: bytes) -> bytes:
    """A Python 2 str: SHORT_BINSTRING or BINSTRING."""
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])            # BININT1
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)  # BININT2
    return b"J" + struct.pack("<i", v)      # BININT


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _list(items: list[bytes]) -> bytes:
    return b"](" + b"".join(items) + b"e"   # EMPTY_LIST MARK ... APPENDS


def _uint8_array(a: np.ndarray) -> bytes:
    """numpy 1.x's pickle of a C-contiguous uint8 array under Python 2."""
    assert a.dtype == np.uint8 and a.flags.c_contiguous
    dtype = (_global("numpy", "dtype") + _str(b"u1") + _int(0) + _int(1) + b"\x87R"   # dtype('u1', 0, 1)
             + b"(" + _int(3) + _str(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb")
    shape = b"(" + b"".join(_int(d) for d in a.shape) + b"t"
    return (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
            + _int(0) + b"\x85" + _str(b"b") + b"\x87R"                                # _reconstruct(ndarray, (0,), 'b')
            + b"(" + _int(1) + shape + dtype + b"\x89" + _str(a.tobytes()) + b"tb")    # BUILD (1, shape, dtype, False, raw)


def py2_pickle(d: dict[bytes, object]) -> bytes:
    """A dict of byte-string keys to ints, byte strings, lists of those, or uint8 arrays."""
    def value(v) -> bytes:
        if isinstance(v, np.ndarray):
            return _uint8_array(v)
        if isinstance(v, bytes):
            return _str(v)
        if isinstance(v, list):
            return _list([value(x) for x in v])
        return _int(int(v))
    return b"\x80\x02}(" + b"".join(_str(k) + value(v) for k, v in d.items()) + b"u."

#----------------------------------------------------------------------------


def write_cifar10(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} with `n_train`
    images split evenly over the five batches (in order) and `n_test` test images; returns root.
    The images are `cifar10_images(n_train, seed)` and `cifar10_images(n_test, seed + 1)`."""
    assert n_train % NUM_TRAIN_BATCHES == 0, "n_train must split evenly over the five batches"
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per = n_train // NUM_TRAIN_BATCHES

    def batch(images, labels, label, first):
        return py2_pickle({b"batch_label": label.encode(), b"labels": [int(y) for y in labels],
                           b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072)),
                           b"filenames": [f"{LABEL_NAMES[y]}_s_{first + i:06d}.png".encode() for i, y in enumerate(labels)]})

    x, y = cifar10_images(n_train, seed)
    for b in range(NUM_TRAIN_BATCHES):
        s = slice(b * per, (b + 1) * per)
        (folder / f"data_batch_{b + 1}").write_bytes(
            batch(x[s], y[s], f"training batch {b + 1} of {NUM_TRAIN_BATCHES}", b * per))
    xt, yt = cifar10_images(n_test, seed + 1)
    (folder / "test_batch").write_bytes(batch(xt, yt, "testing batch 1 of 1", 0))
    (folder / "batches.meta").write_bytes(py2_pickle({b"num_cases_per_batch": per, b"label_names": [
        n.encode() for n in LABEL_NAMES], b"num_vis": 3072}))
    return Path(root)
