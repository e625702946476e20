"""Quality vs NFE for every recipe that has run, with sampling throughput.

For each `outputs/<recipe>/eval/metrics.json`: the teacher at its largest NFE and each student at
NFE 1, 2, 4, 8 (where evaluated), as the primary metric (2D: sliced W2, with NLL beside it; images:
FD in the recipe's feature network) with its floor (real vs real), the ratio of the student's
distance above the floor to the teacher's (1 = as good as the teacher at full NFE; the 1-step
target is ≤ 2, docs/methods.md §1), and samples/s measured here. Writes
bench/results/quality.json, bench/results/quality.md (the table) and bench/results/quality.png
(ratio vs NFE, one panel per dataset kind); prints the table. Measured tables: docs/results.md.

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

from fastgen_core import artifacts  # noqa: E402
from fastgen_core.models import load_model  # noqa: E402

STUDENT_NFE = (1, 2, 4, 8)


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


def evaluations(outputs: Path):
    """(manifest, metrics) of every evaluate stage under `outputs`."""
    for ev in sorted(outputs.glob("*/*/metrics.json")):
        try:
            man = artifacts.read_manifest(ev.parent)
        except FileNotFoundError:
            continue
        if man.get("kind") == "evaluate":
            yield man, json.loads(ev.read_text())


def recipe_rows(man: dict, res: dict, n: int) -> list[dict]:
    prim = "fd" if any("fd" in v for r in res.values() for v in r.values() if isinstance(v, dict)) else "swd"
    rows, teacher_ref = [], None
    for name, inp in man["inputs"].items():
        if inp["role"] != "models" or name not in res:
            continue
        model = load_model(inp["path"])
        is_teacher = model.meta["method"] == "edm"
        per = {int(k[4:]): v for k, v in res[name].items() if k.startswith("nfe_")}
        keep = [max(per)] if is_teacher else [k for k in sorted(per) if k in STUDENT_NFE]
        if is_teacher:  # the reference: the best EDM model of the recipe (not e.g. a weak guide)
            ref = {m: s["mean"] - s["floor_mean"] for m, s in per[max(per)].items()}
            if teacher_ref is None or ref[prim] < teacher_ref[prim]:
                teacher_ref = ref
        for nfe in keep:
            stats = per[nfe]
            rows.append({"recipe": man["recipe"], "model": name, "method": model.meta["method"], "nfe": nfe,
                         "metric": prim, "data": "images" if prim == "fd" else "2D toy",
                         **{f"{m}_{k}": s[k] for m, s in stats.items() for k in ("mean", "std", "floor_mean")},
                         "samples_per_s": round(samples_per_s(model, nfe, n), 1)})
    for r in rows:
        for m, ref in (teacher_ref or {}).items():
            if m in ("swd", "nll", "fd") and f"{m}_mean" in r and ref > 0:
                r[f"{m}_ratio_to_teacher"] = round((r[f"{m}_mean"] - r[f"{m}_floor_mean"]) / ref, 3)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["data"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        prim = "fd" if kind == "images" else "swd"
        curves: dict[str, dict[int, float]] = {}
        for r in rows:
            if r["data"] == kind and r["method"] != "edm" and f"{prim}_ratio_to_teacher" in r:
                curves.setdefault(f"{r['recipe']}/{r['model']}", {})[r["nfe"]] = r[f"{prim}_ratio_to_teacher"]
        for name, pts in sorted(curves.items()):
            k = sorted(pts)
            ax.plot(k, [max(pts[i], 1e-2) for i in k], marker="o", label=name)
        ax.axhline(1, c="k", lw=1, label="teacher at full NFE")
        ax.axhline(2, c="k", lw=1, ls="--", label="2× teacher (1-step target)")
        ax.set(xscale="log", yscale="log", xticks=list(STUDENT_NFE), xticklabels=[str(k) for k in STUDENT_NFE],
               xlabel="NFE", ylabel=f"{prim} above floor / teacher's", title=f"{kind}: {prim} ratio to the teacher")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    cols = ["recipe", "model", "nfe", "swd_mean", "swd_floor_mean", "swd_ratio_to_teacher", "nll_mean",
            "fd_mean", "fd_floor_mean", "fd_ratio_to_teacher", "samples_per_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", default=str(ROOT / "outputs"))
    ap.add_argument("--n", type=int, default=5000, help="samples per throughput measurement")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for man, res in evaluations(Path(a.outputs)) for r in recipe_rows(man, res, a.n)]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.machine(), "processor": platform.processor(), "threads": 1,
               "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    (out / "quality.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = table(rows)
    (out / "quality.md").write_text(md + "\n")
    if rows:
        plot(rows, out / "quality.png")
    print(md)
    print(f"\nmachine: {machine}; wrote {out / 'quality.json'}, quality.md, quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
