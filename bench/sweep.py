"""A 4-trial sweep over the work pool with 2 workers, against the same 4 trials run one after another.

Sets up what tests/test_deploy.py sets up, in a throwaway copy of the project: a real `prefect
server` on 127.0.0.1 (own PREFECT_HOME, free port), the work pools, `prefect deploy --all` from
its root, and two `prefect worker` processes of the process pool (each `--limit 1`: two machines
of one trial each). The recipe is params/toy_cd.yaml scaled down (bench/pipeline.py `tiny`), the
grid 2 × 2 over the CD student's settings, so the teacher and the ODE pairs are the same in every
trial.

    sweep       `fastgen sweep` of the 4 trials, --max-parallel 2: the stages shared by every trial
                (same params and inputs digests) run once and are reused by the others
                (stages/reuse.py)
    sequential  the same 4 trials with `fastgen run -S ...` one after another, each into its own
                fresh storage root: every stage of every trial runs (what a user chaining scripts
                by hand gets)

The reuse saving is the shared stages' compute time of the sequential runs that the sweep did not
repeat (3 of 4 trials' teacher + pairs), read from the stages' manifests.

    python bench/sweep.py                 # writes bench/results/sweep.json
    python bench/sweep.py --steps 60      # a smaller recipe
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests"))

from bench.pipeline import tiny  # noqa: E402
from servers import BIN, free_port, prefect_env, start, stop, wait_http  # noqa: E402

GRID = {"stages.cd.method.N": [6, 10], "stages.cd.train.lr": ["1e-3", "5e-4"]}
SHARED = ("teacher", "pairs")


def recipe(steps: int) -> dict:
    full = yaml.safe_load((PROJECT / "params/toy_cd.yaml").read_text())
    raw = tiny(full)
    raw["name"] = "sweepbench"
    for name, st in raw["stages"].items():
        if "train" in st:  # tiny caps steps at 150: take them from the full recipe, capped at `steps`
            st["train"]["steps"] = min(full["stages"][name]["train"]["steps"], steps)
    raw["stages"]["eval"]["evaluate"].update(n_samples=500, seeds=[0], nfe=[1, 2], teacher_nfe=[3], plots=False)
    return raw


def stage_seconds(root: Path, name: str) -> dict[str, float]:
    """Each stage's wall time, from its manifest."""
    return {m.parent.name: float(json.loads(m.read_text())["wall_s"]) for m in (root / name).glob("*/manifest.json")}


def computed_here(trial: Path, name: str, stage: str) -> bool:
    """Whether the trial's output of `stage` was made in this trial (a reused output keeps the
    manifest of the trial that made it, whose location is that trial's)."""
    m = trial / name / stage / "manifest.json"
    return m.exists() and str(trial) in json.loads(m.read_text())["location"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="training steps per stage (default 150)")
    ap.add_argument("--out", default=str(PROJECT / "bench/results/sweep.json"))
    a = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="fastgen-sweepbench-"))
    for sub in ("fastgen_core", "stages", "flows"):
        shutil.copytree(PROJECT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (d / "params").mkdir()
    raw = recipe(a.steps)
    raw["tracking"] = {"uri": f"sqlite:///{d / 'mlflow.db'}"}
    (d / "params/sweepbench.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    env = prefect_env(d, base)

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    grid_args = [x for k, v in GRID.items() for x in ("-S", f"{k}={','.join(map(str, v))}")]
    trials = [{k1: v1, k2: v2} for k1, k2 in [tuple(GRID)] for v1 in GRID[k1] for v2 in GRID[k2]]
    procs = []
    try:
        sh(sys.executable, "-m", "stages.dvcgen")
        server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       d / "server.log", env)
        procs.append(server)
        wait_http(f"{base}/health", server, d / "server.log", timeout=180)
        for pool in ("fastgen-process", "fastgen-sweeps"):
            sh(BIN / "prefect", "work-pool", "create", pool, "--type", "process")
        sh(BIN / "prefect", "--no-prompt", "deploy", "--all")
        for i in range(2):
            procs.append(start([str(BIN / "prefect"), "worker", "start", "--pool", "fastgen-process", "--limit", "1"],
                               d / f"worker{i}.log", env))

        print(f"sweep: {len(trials)} trials, 2 workers ...", flush=True)
        t0 = time.perf_counter()
        sh(sys.executable, "-m", "stages.cli", "sweep", "sweepbench", *grid_args, "--max-parallel", "2")
        sweep_s = time.perf_counter() - t0

        print("sequential: the same trials one after another ...", flush=True)
        seq_s, seq_stages = [], []
        for i, t in enumerate(trials):
            root = d / f"seq{i}"
            sets = [x for k, v in {**t, "storage.root": str(root)}.items() for x in ("-S", f"{k}={v}")]
            t0 = time.perf_counter()
            sh(sys.executable, "-m", "stages.cli", "run", "sweepbench", *sets)
            seq_s.append(time.perf_counter() - t0)
            seq_stages.append(stage_seconds(root, "sweepbench"))
    finally:
        for p in reversed(procs):
            stop(p)

    sweeps = list((d / "outputs/sweeps").iterdir())
    trial_dirs = [p for p in sweeps[0].iterdir() if not p.name.startswith(".")] if sweeps else []
    ran_shared = {s: sum(computed_here(p, "sweepbench", s) for p in trial_dirs) for s in SHARED}
    saved = sum(st.get(s, 0.0) for st in seq_stages[1:] for s in SHARED)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_at_end": os.getloadavg(),
        "recipe": "params/toy_cd.yaml scaled down (bench/pipeline.py tiny)", "train_steps": a.steps,
        "grid": GRID, "trials": len(trials), "workers": 2,
        "sweep_wall_s": round(sweep_s, 1), "sequential_wall_s": round(sum(seq_s), 1),
        "sequential_per_trial_s": [round(x, 1) for x in seq_s],
        "speedup": round(sum(seq_s) / sweep_s, 2),
        "shared_stages": list(SHARED), "shared_stage_s_per_trial": {s: round(seq_stages[0].get(s, 0.0), 1) for s in SHARED},
        "shared_stage_s_not_repeated": round(saved, 1),
        "shared_stages_computed_in_sweep": ran_shared,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{'':24}{'wall s':>8}\n{'sweep (2 workers)':24}{sweep_s:8.1f}\n{'sequential':24}{sum(seq_s):8.1f}"
          f"\nspeed-up {res['speedup']}x; shared stages {', '.join(SHARED)} computed "
          f"{ran_shared} time(s) in the sweep; {saved:.1f} s of their compute not repeated\n-> {a.out}")
    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
