"""Quality vs NFE for every recipe that has run, with sampling throughput.

For each `outputs/<recipe>/eval/metrics.json`: the teacher at its largest NFE and each student at
NFE 1, 2, 4, 8 (where evaluated), as the primary metric (2D: sliced W2 and NLL; images: FD) with
its floor, the ratio of the student's distance-above-floor to the teacher's, and samples/s measured
here. Writes bench/results/quality.json and bench/results/quality.png; prints a table.

    python bench/quality.py [--outputs outputs] [--n 5000]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastgen_core import artifacts, plots  # noqa: E402
from fastgen_core.models import load_model  # noqa: E402


def samples_per_s(model, nfe: int, n: int) -> float:
    z = torch.randn((n, *model.shape))
    y = torch.zeros(n, dtype=torch.long) if model.num_classes > 0 else None
    model.sample(z[:8], nfe, None if y is None else y[:8])  # warm-up
    best = float("inf")
    for _ in range(3):  # best of 3: the machine may be shared
        t = time.perf_counter()
        model.sample(z, nfe, y)
        best = min(best, time.perf_counter() - t)
    return n / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", default=str(ROOT / "outputs"))
    ap.add_argument("--n", type=int, default=5000, help="samples per throughput measurement")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, curves = [], {}
    for ev in sorted(Path(a.outputs).glob("*/*/metrics.json")):
        folder = ev.parent
        try:
            man = artifacts.read_manifest(folder)
        except FileNotFoundError:
            continue
        if man.get("kind") != "evaluate":
            continue
        res = json.loads(ev.read_text())
        prim = "fd" if any("fd" in v for r in res.values() for v in r.values() if isinstance(v, dict)) else "swd"
        teacher_ref = None
        for name, inp in man["inputs"].items():
            if inp["role"] != "models":
                continue
            model = load_model(inp["path"])
            is_teacher = model.meta["method"] == "edm"
            per = {k: v for k, v in res.get(name, {}).items() if k.startswith("nfe_")}
            for key, stats in sorted(per.items(), key=lambda kv: int(kv[0][4:])):
                nfe = int(key[4:])
                if not is_teacher and nfe not in (1, 2, 4, 8):
                    continue
                row = {"recipe": man["recipe"], "model": name, "method": model.meta["method"], "nfe": nfe,
                       "metric": prim, **{f"{m}_{k}": s[k] for m, s in stats.items() for k in ("mean", "std", "floor_mean")},
                       "samples_per_s": round(samples_per_s(model, nfe, a.n), 1)}
                rows.append(row)
                curves.setdefault(f"{man['recipe']}/{name}", {})[nfe] = (stats[prim]["mean"], stats[prim]["std"])
            if is_teacher:
                best = max(per, key=lambda k: int(k[4:]))
                teacher_ref = {m: per[best][m]["mean"] - per[best][m]["floor_mean"] for m in per[best]}
        for r in rows:
            if r["recipe"] == man["recipe"] and teacher_ref:
                for m, ref in teacher_ref.items():
                    if f"{m}_mean" in r and m in ("swd", "nll", "fd") and ref > 0:
                        r[f"{m}_ratio_to_teacher"] = round((r[f"{m}_mean"] - r[f"{m}_floor_mean"]) / ref, 3)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
               "cuda": torch.cuda.is_available()}
    (out / "quality.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    if curves:
        plots.quality_vs_nfe(curves, None, "primary metric (swd or fd)", out / "quality.png")
    cols = ["recipe", "model", "nfe", "metric", "swd_mean", "swd_floor_mean", "swd_ratio_to_teacher", "nll_mean",
            "nll_ratio_to_teacher", "fd_mean", "fd_floor_mean", "fd_ratio_to_teacher", "samples_per_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    print(f"\nmachine: {machine}; wrote {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
