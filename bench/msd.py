"""Samples/s of Multi-Student Distillation models (docs/methods.md §8): routers of same-size and of
smaller students against one student, at 1 NFE, on the CPU, one torch thread.

    python -m bench.msd OUTPUTS/<recipe> single msd2 msd4 msd2s msd4s [--n 4096] [--repeats 5] [--json out.json]

Each model (a stage's model folder under OUTPUTS/<recipe>) generates n samples with class labels
cycling over every class, after one warm-up call; the figure is the median over `repeats` timed
calls, with the network parameters of one student (a router's: each student's and their sum).
A router pays, besides its students' network calls, the cost of splitting the batch by class.
Timings on a shared machine vary with its load: compare models measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fastgen_core.models import load_model


def n_params(nets) -> int:
    return sum(p.numel() for p in nets.parameters())


@torch.no_grad()
def samples_per_s(model, n: int, repeats: int) -> float:
    z = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % model.num_classes if model.num_classes else None
    model.sample(z, 1, y)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.sample(z, 1, y)
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="the recipe's output folder (OUTPUTS/<recipe>)")
    ap.add_argument("stages", nargs="+", help="model stages to time (students or routers)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    for stage in a.stages:
        model = load_model(Path(a.root) / stage)
        if model.meta["method"] == "router":
            per = [n_params(torch.nn.ModuleDict({n: model.nets[f"s{k}_{n}"] for n in s["nets"]}))
                   for k, s in enumerate(model.meta["students"])]
        else:
            per = [n_params(model.nets)]
        rows[stage] = {"method": model.meta["method"], "students": len(per), "params_per_student": per,
                       "params_total": sum(per), "samples_per_s": round(samples_per_s(model, a.n, a.repeats), 1)}
        r = rows[stage]
        print(f"{stage:>10}: {r['samples_per_s']:>10.1f} samples/s at 1 NFE  ({r['method']}, {r['students']} "
              f"student(s), {max(per):,} parameters each)", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps({"n": a.n, "repeats": a.repeats, "models": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
