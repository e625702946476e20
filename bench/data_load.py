"""Loading an image folder: the first load (decoded once into the cache) against later loads
(memory-mapped from the cache), and a folder below DECODE_CACHE_MIN (decoded on every load).

Writes N RGB JPEGs of --source pixels (smooth random images: 32x32 noise enlarged) under a
temporary folder, 10 classes, as ImageNet's are, then times `load_data` of it at data.resolution
--size (centre crop and Lanczos resize, as the imagenet64 recipes): the first load, which decodes every file and writes
the uint8 array to $FASTGEN_CACHE_DIR/decoded/, then --repeats later loads from the cache, and the
same number of loads with the cache turned off (every load decodes). Every stage, and every training
worker of a stage, loads the data: the later loads are what each of them pays. Writes
bench/results/data_load.json; prints a table.

    python bench/data_load.py [--images 6000] [--source 256] [--size 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fastgen_core.data as D  # noqa: E402
from fastgen_core.config import DataConfig  # noqa: E402


def write_folder(root: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        small.resize((size, size), Image.BILINEAR).save(folder / f"{i:07d}.jpg", quality=90)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--source", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        os.environ["FASTGEN_CACHE_DIR"] = str(Path(tmp) / "cache")
        t_write = timed(lambda: write_folder(root, args.images, args.source))
        cfg = DataConfig(kind="images", name="folder", root=str(root), conditional=True, resolution=args.size)
        first = timed(lambda: D.load_data(cfg))
        cached = [timed(lambda: D.load_data(cfg)) for _ in range(args.repeats)]
        D.DECODE_CACHE_MIN = args.images + 1  # the cache off: every load decodes
        uncached = [timed(lambda: D.load_data(cfg)) for _ in range(args.repeats)]
        size_mb = sum(f.stat().st_size for f in (Path(tmp) / "cache" / "decoded").iterdir()) / 2**20
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "load_average": os.getloadavg()[0], "images": args.images, "source": args.source, "size": args.size,
           "write_s": t_write, "first_load_s": first, "cached_load_s": cached, "uncached_load_s": uncached,
           "cache_mb": size_mb}
    print(f"{args.images} JPEGs of {args.source}x{args.source}x3 read at {args.size}x{args.size}, machine {out['machine']}, load {out['load_average']:.2f}")
    print(f"{'first load (decode + write cache)':38s} {first:8.2f} s")
    print(f"{'later load, cached (median)':38s} {np.median(cached):8.2f} s   "
          f"{np.median(uncached) / np.median(cached):.1f}x faster than decoding")
    print(f"{'later load, no cache (median)':38s} {np.median(uncached):8.2f} s")
    print(f"{'cache file':38s} {size_mb:8.1f} MB")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "data_load.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
