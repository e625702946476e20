"""LowDiff against its single-resolution EDM teacher at matched quality (docs/methods.md §11).

Reads a LowDiff recipe's trained `teacher`, `lowdiff` and `features` stages (run them first, e.g.
`python -m stages.run params/digits_lowdiff.yaml lowdiff`) and measures, with the evaluate stage's
protocol (n samples per seed, class-matched labels, FD in the recipe's classifier features, floor =
real train vs real test):

- the teacher's FD at each NFE (all at full resolution) and its samples/s;
- LowDiff's FD for each split of the low-resolution NFE (`--splits`) and each full-resolution NFE,
  its total NFE and samples/s;
- at matched FD: for each LowDiff point, the fewest teacher NFE whose mean FD is at most LowDiff's,
  and the ratios of full-resolution NFE and samples/s.

samples/s: best of 3 timed runs of n samples (one batch, one thread); every evaluation here holds
every level at full size, so a low-resolution NFE costs as much as a full-resolution one (the
`native_cost` column is Σ_k nfe_k·(r_k/H)², what a network at native sizes would spend in
full-resolution evaluations: an estimate, not measured). Writes JSON (default
bench/results/lowdiff.json) and a plot of FD against full-resolution NFE next to it; prints the table.

    python bench/lowdiff.py [--recipe params/digits_lowdiff.yaml] [--splits 3,3 5,5 9,5] [--nfe 1 3 5 7 9]
                            [--refine 80 5 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastgen_core import metrics as M  # noqa: E402
from fastgen_core.data import cached_data  # noqa: E402
from fastgen_core.methods.lowdiff import pyramid, side_of  # noqa: E402
from fastgen_core.models import load_model  # noqa: E402
from fastgen_core.samplers import teacher_nfe  # noqa: E402
from stages.recipe import load_recipe  # noqa: E402
from stages.runtime import stage_dir  # noqa: E402


def generate(model, n, seed, labels, **kw):
    """As the evaluate stage: z from seed 10000 + s, the global generator at 20000 + s."""
    z = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(10_000 + seed))
    torch.manual_seed(20_000 + seed)
    return _sample(model, z, labels[seed], **kw)


def _sample(model, z, y, nfe, **kw):
    with torch.no_grad():
        return model.method.sample(model, z, nfe, y if model.num_classes else None, **kw).float()


def samples_per_s(model, n, y, nfe, **kw) -> float:
    z = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(1))
    _sample(model, z[:8], y[:8], nfe, **kw)  # warm-up
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        _sample(model, z, y, nfe, **kw)
        best = min(best, time.perf_counter() - t)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "params" / "digits_lowdiff.yaml"))
    ap.add_argument("--teacher-nfe", type=int, nargs="+", default=[3, 5, 7, 9, 11, 13, 19, 35])
    ap.add_argument("--nfe", type=int, nargs="+", default=[1, 3, 5, 7, 9])
    ap.add_argument("--splits", nargs="+", default=None, help="low-resolution NFE per lower level, e.g. 5,5")
    ap.add_argument("--refine", type=float, nargs="+", default=[None],
                    help="refine_sigma_max values to sweep (levels ≥ 1 start from c + σ·ε; default the model's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=397)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lowdiff.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)

    r = load_recipe(a.recipe)
    teacher, low = load_model(stage_dir(r, "teacher")), load_model(stage_dir(r, "lowdiff"))
    fnet = load_model(stage_dir(r, "features")).nets["net"]
    data = cached_data(r.data)
    feats = lambda x: fnet.features(x).detach()  # noqa: E731
    ref = feats(data.x_test)
    n = min(a.n, len(data.x_test))
    labels = {s: M.eval_labels(data.y_test, n, s) for s in a.seeds}
    metric = lambda s: {"fd": M.frechet_distance(feats(s), ref)}  # noqa: E731
    floor = M.floor_metrics(metric, data.x, n, a.seeds, data.y, labels)
    floor_fd = sum(f["fd"] for f in floor) / len(floor)
    (res, default_low), side = pyramid(low.cfg, low.shape), side_of(low.shape)
    splits = [[int(v) for v in s.split(",")] for s in a.splits] if a.splits else [default_low]

    def fd(model, **kw):
        st = M.with_floor(metric, lambda s: generate(model, n, s, labels, **kw), data.x, n, a.seeds, floor=floor)["fd"]
        return round(st["mean"], 4), round(st["std"], 4)

    rows = []
    for k in a.teacher_nfe:
        m, s = fd(teacher, nfe=k)
        rows.append({"model": "teacher", "low_nfe": [], "full_nfe": teacher_nfe(k), "total_nfe": teacher_nfe(k),
                     "native_cost": teacher_nfe(k), "fd": m, "fd_std": s,
                     "samples_per_s": round(samples_per_s(teacher, n, labels[a.seeds[0]], k), 1)})
        print(rows[-1], flush=True)
    for split, refine in [(sp, rf) for sp in splits for rf in a.refine]:
        for k in a.nfe:
            m, s = fd(low, nfe=k, low_nfe=split, refine_sigma_max=refine)
            cost = sum(v * (rr / side) ** 2 for v, rr in zip(split, res)) + teacher_nfe(k)
            rows.append({"model": "lowdiff", "low_nfe": split, "refine_sigma_max": refine or low.cfg.refine_sigma_max,
                         "full_nfe": teacher_nfe(k),
                         "total_nfe": sum(split) + teacher_nfe(k), "native_cost": round(cost, 3), "fd": m, "fd_std": s,
                         "samples_per_s": round(samples_per_s(low, n, labels[a.seeds[0]], k, low_nfe=split,
                                                              refine_sigma_max=refine), 1)})
            print(rows[-1], flush=True)
    teach = sorted((x for x in rows if x["model"] == "teacher"), key=lambda x: x["full_nfe"])
    for x in rows:
        if x["model"] != "lowdiff":
            continue
        match = next((t for t in teach if t["fd"] <= x["fd"]), None)
        x["matched_teacher_nfe"] = match and match["full_nfe"]
        if match:
            x["full_nfe_ratio"] = round(x["full_nfe"] / match["full_nfe"], 3)
            x["speedup_samples_per_s"] = round(x["samples_per_s"] / match["samples_per_s"], 3)
    out = {"recipe": r.name, "n": n, "seeds": a.seeds, "floor_fd": round(floor_fd, 4), "resolutions": res,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\nfloor FD {floor_fd:.4f}; n = {n}, seeds {a.seeds}")
    print(f"{'model':8} {'low_nfe':8} {'σ_ref':>5} {'full':>4} {'total':>5} {'native':>6} {'FD':>14} {'samples/s':>9} "
          f"{'matched teacher NFE':>19} {'speedup':>7}")
    for x in rows:
        print(f"{x['model']:8} {','.join(map(str, x['low_nfe'])) or '-':8} {str(x.get('refine_sigma_max') or '-'):>5} {x['full_nfe']:4d} {x['total_nfe']:5d} "
              f"{x['native_cost']:6.2f} {x['fd']:7.4f}±{x['fd_std']:.4f} {x['samples_per_s']:9.1f} "
              f"{str(x.get('matched_teacher_nfe', '')):>19} {str(x.get('speedup_samples_per_s', '')):>7}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar([t["full_nfe"] for t in teach], [t["fd"] for t in teach], [t["fd_std"] for t in teach],
                    marker="o", label="teacher (8x8 only)")
        for split, refine in [(sp, rf) for sp in splits for rf in a.refine]:
            rf = refine or low.cfg.refine_sigma_max
            pts = [x for x in rows if x["model"] == "lowdiff" and x["low_nfe"] == split and x["refine_sigma_max"] == rf]
            ax.errorbar([x["full_nfe"] for x in pts], [x["fd"] for x in pts], [x["fd_std"] for x in pts], marker="s",
                        label=f"LowDiff, low NFE {'+'.join(map(str, split))}" + (f", σ_ref {rf:g}" if rf else ""))
        ax.axhline(floor_fd, color="grey", ls="--", label="floor (real vs real)")
        ax.set(xscale="log", yscale="log", xlabel="full-resolution NFE", ylabel="FD (classifier features)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(a.out).with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
