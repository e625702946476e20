"""Where a pipeline's wall time goes: run a recipe stage by stage as separate processes, the way
`dvc repro` does (`python -m stages.run RECIPE STAGE --force`), into a fresh storage root and
MLflow store, and split each stage's wall time into compute and overhead.

Each stage prints one `[fastgen-timing] {json}` line on stderr (stages/runtime.py) with its phases;
the launch time measured here gives process start + imports, the exit time the teardown:

    startup     launch -> run_stage entered (interpreter start, imports of torch, stages, ...)
    mlflow      MLflow client/store set-up, parent/child run creation, params, final tags/status
    ray_init    `import ray` + `ray.init` (local runtime start; ~0 when reusing a cluster)
    ray_train   Ray Train fixed cost: TorchTrainer.fit wall minus the rank-0 worker's own work
                (controller + worker processes start and import, process group, report/checkpoint)
    data        data set loading, input verification (manifest digests), model/method construction
    compute     the training loop (training stages) or the stage's own work (pairs, evaluate)
    other       recipe parse, stage import, git, manifest writing, checkpoint copy, save
    teardown    run_stage returned -> process exited (atexit handlers, Ray shutdown)

    python bench/pipeline.py                          # params/toy_cd.yaml, local backend
    python bench/pipeline.py --backend ray            # every training stage on Ray Train (2 workers)
    python bench/pipeline.py --tiny --backend ray     # a scaled-down recipe (seconds of compute)
    python bench/pipeline.py --tiny --backend ray --stages teacher --ray-tuning default
                                                      # Ray as the code shipped it, for comparison

Writes bench/results/pipeline-<backend>[-tiny].json (override with --out) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
PREFIX = "[fastgen-timing]"
COLUMNS = ["startup", "mlflow", "ray_init", "ray_train", "data", "compute", "other", "teardown"]


def tiny(raw: dict) -> dict:
    """Scale a recipe down to seconds of compute, keeping its stage graph."""
    raw = copy.deepcopy(raw)
    d = raw.setdefault("data", {})
    if d.get("kind", "toy") == "toy":
        d["n_train"], d["n_test"] = min(d.get("n_train", 20000), 2000), min(d.get("n_test", 5000), 500)
    for st in raw["stages"].values():
        if st.get("network", {}).get("arch", "mlp") == "mlp" and "network" in st:
            st["network"].update(width=32, depth=2, emb_dim=16)
        if st.get("kind") in TRAINING_KINDS:  # a stage's settings are strict: only its kind's
            tr = st.setdefault("train", {})
            tr["steps"] = min(tr.get("steps", 2000), 150)
            tr["log_every"], tr["lr_warmup"] = 10, min(tr.get("lr_warmup", 0), 10)
        if st.get("kind") == "ode_pairs":
            pr = st.setdefault("pairs", {})
            pr["n_pairs"], pr["steps"] = min(pr.get("n_pairs", 20000), 500), min(pr.get("steps", 18), 6)
        if st.get("kind") == "evaluate":
            ev = st.setdefault("evaluate", {})
            ev["n_samples"] = min(ev.get("n_samples", 5000), 500)
            ev["seeds"] = ev.get("seeds", [0, 1, 2])[:2]
            ev["nfe"] = ev.get("nfe", [1, 2, 4, 8])[:2]
            ev["teacher_nfe"] = [1, 5]
    return raw


# phase (stages/runtime.py, stages/train.py) -> column. `run` (the stage's own code) is split
# by the phases nested in it (`run/<name>`); what is left of it is the stage's own work.
OUTSIDE_RUN = {"recipe": "other", "inputs": "data", "import": "other", "git": "other", "data": "data",
               "mlflow_setup": "mlflow", "manifest": "other", "mlflow_end": "mlflow"}
INSIDE_RUN = {"data": "data", "model_setup": "data", "mlflow_worker": "mlflow", "ray_init": "ray_init",
              "ray_trainer": "ray_train", "train": "compute", "save": "other", "checkpoint_copy": "other"}
TRAINING_KINDS = ("teacher", "distill", "feature_net")


def breakdown(wall: float, launched: float, rec: dict | None) -> dict:
    """Split one stage process's wall time into the COLUMNS (seconds)."""
    if rec is None:
        return {"wall": round(wall, 3)}
    out = dict.fromkeys(COLUMNS, 0.0)
    out["startup"] = rec["t_entry"] - launched
    out["teardown"] = wall - out["startup"] - rec["total_s"]
    inside = 0.0
    for name, sec in rec["phases"].items():
        if name.startswith("run/"):
            out[INSIDE_RUN.get(name[4:], "other")] += sec
            inside += sec
        elif name != "run":
            out[OUTSIDE_RUN.get(name, "other")] += sec
    rest = max(rec["phases"].get("run", 0.0) - inside, 0.0)  # the stage's code between the phases
    out["compute" if rec["kind"] not in TRAINING_KINDS else "other"] += rest
    out = {"wall": wall, **out, "overhead": wall - out["compute"]}
    return {k: round(v, 3) for k, v in out.items()}


class SessionCPU(threading.Thread):
    """CPU seconds of every process in session `sid` (a stage process started in a new session:
    with it its Ray daemons, actors and workers), sampled from /proc every `every` seconds; each
    process's last sample counts, so at most `every` s of CPU per process goes unseen."""

    def __init__(self, sid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.sid, self.every, self.cpu, self.done = sid, every, {}, threading.Event()
        self.tck = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(f[3]) == self.sid:  # fields after the name: state ppid pgrp session ...
                    self.cpu[int(d)] = (int(f[11]) + int(f[12])) / self.tck  # utime + stime

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def total(self) -> tuple[float, int]:
        self.done.set()
        self.join()
        return sum(self.cpu.values()), len(self.cpu)


def start_cluster(env: dict, num_cpus: int, tuned: bool) -> str:
    """`ray start --head` a local cluster the stages attach to through RAY_ADDRESS."""
    from stages.train import _LOCAL_RAY_SYSTEM_CONFIG

    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--num-cpus={num_cpus}",
           "--include-dashboard=false", "--disable-usage-stats"]
    if tuned:
        cmd.append(f"--system-config={json.dumps(_LOCAL_RAY_SYSTEM_CONFIG)}")
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return "auto"


def stop_cluster(env: dict) -> None:
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop"], env=env, capture_output=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="params/toy_cd.yaml")
    ap.add_argument("--backend", choices=["local", "ray"], default="local")
    ap.add_argument("--num-workers", type=int, default=2, help="ray: training workers")
    ap.add_argument("--tiny", action="store_true", help="scale the recipe down (seconds of compute)")
    ap.add_argument("--stages", nargs="*", help="only these stages (with their upstream; default: all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the stage processes (default: inherit)")
    ap.add_argument("--ray-tuning", choices=["default", "fast"], default=None,
                    help="set FASTGEN_RAY_TUNING for the stages (default: leave the env as it is)")
    ap.add_argument("--reuse-cluster", action="store_true",
                    help="ray: start one local cluster first (`ray start --head`) and attach every stage "
                         "to it via RAY_ADDRESS, as a long-lived cluster would be")
    ap.add_argument("--pycache", metavar="DIR",
                    help="PYTHONPYCACHEPREFIX for the stage processes (bytecode cache outside the venv; "
                         "a first run fills it)")
    ap.add_argument("--cold-mlflow", action="store_true",
                    help="do not create the MLflow DB before the first stage (its schema migration "
                         "then counts in that stage's mlflow time)")
    ap.add_argument("--out", help="JSON output (default bench/results/pipeline-<backend>[-tiny].json)")
    a = ap.parse_args(argv)

    recipe_path = Path(a.recipe) if Path(a.recipe).is_absolute() else PROJECT / a.recipe
    raw = yaml.safe_load(recipe_path.read_text())
    if a.tiny:
        raw = tiny(raw)
    raw["compute"] = {**raw.get("compute", {}), "backend": a.backend,
                      **({"num_workers": a.num_workers} if a.backend == "ray" else {})}
    work = Path(tempfile.mkdtemp(prefix="fastgen-bench-"))
    raw["storage"] = {"root": str(work / "outputs")}
    raw["tracking"] = {**raw.get("tracking", {}), "uri": f"sqlite:///{work / 'mlflow.db'}"}
    rpath = work / recipe_path.name
    rpath.write_text(yaml.safe_dump(raw, sort_keys=False))

    sys.path.insert(0, str(PROJECT))
    from stages.recipe import load_recipe

    recipe = load_recipe(rpath)
    order = recipe.order()
    if a.stages:
        want: list[str] = []

        def add(s):
            for u in recipe.upstream(s):
                add(u)
            if s not in want:
                want.append(s)

        for s in a.stages:
            add(s)
        order = [s for s in order if s in want]

    env = {**os.environ, "FASTGEN_INVOCATION": f"bench-{uuid.uuid4().hex[:12]}", "TQDM_DISABLE": "1"}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if a.ray_tuning:
        env["FASTGEN_RAY_TUNING"] = a.ray_tuning
    if a.pycache:
        env["PYTHONPYCACHEPREFIX"] = str(Path(a.pycache).resolve())
        env.pop("PYTHONDONTWRITEBYTECODE", None)

    setup = {}
    if not a.cold_mlflow:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from mlflow import MlflowClient; "
                        "MlflowClient(sys.argv[1]).search_experiments()", raw["tracking"]["uri"]],
                       env=env, check=True, capture_output=True)
        setup["mlflow_db_init_s"] = round(time.perf_counter() - t, 3)
    if a.backend == "ray" and a.reuse_cluster:
        tuned = env.get("FASTGEN_RAY_TUNING", "fast") != "default"
        if tuned:  # _ray_init leaves an existing cluster's settings alone: set them for the drivers
            from stages.train import _LOCAL_RAY_ENV

            env = {**_LOCAL_RAY_ENV, **env}
        t = time.perf_counter()
        env["RAY_ADDRESS"] = start_cluster(env, max(os.cpu_count() or 1, a.num_workers), tuned)
        setup["ray_start_head_s"] = round(time.perf_counter() - t, 3)

    rows, log_dir = [], work / "logs"
    log_dir.mkdir()
    try:
        for stage in order:
            kind = recipe.stages[stage].kind
            cmd = [sys.executable, "-m", "stages.run", str(rpath), stage, "--force"]
            launched, t0 = time.time(), time.perf_counter()
            with subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True) as proc:
                # CPU time of the stage's whole process tree: less sensitive than wall time to
                # other jobs on a shared machine
                meter = SessionCPU(proc.pid)
                meter.start()
                stdout, stderr = proc.communicate()
            wall = time.perf_counter() - t0
            cpu, n_procs = meter.total()
            p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
            (log_dir / f"{stage}.log").write_text(p.stdout + p.stderr)
            if p.returncode:
                print(p.stderr[-4000:], file=sys.stderr)
                print(f"stage {stage} failed (exit {p.returncode}); log in {log_dir}", file=sys.stderr)
                return 1
            rec = next((json.loads(line[len(PREFIX):]) for line in p.stderr.splitlines()
                        if line.startswith(PREFIX)), None)
            rows.append({"stage": stage, "kind": kind, **breakdown(wall, launched, rec), "cpu": round(cpu, 3), "processes": n_procs,
                         "load_avg_1m": round(os.getloadavg()[0], 2), "phases": rec["phases"] if rec else None})
    finally:
        if a.backend == "ray" and a.reuse_cluster:
            stop_cluster(env)

    tot = {c: round(sum(r.get(c, 0.0) for r in rows), 3) for c in ["wall", *COLUMNS, "overhead", "cpu", "processes"]}
    result = {"recipe": str(a.recipe), "tiny": a.tiny, "backend": a.backend,
              "num_workers": a.num_workers if a.backend == "ray" else None,
              "ray_tuning": os.environ.get("FASTGEN_RAY_TUNING") if a.ray_tuning is None else a.ray_tuning,
              "reuse_cluster": a.reuse_cluster, "pycache": bool(a.pycache), "threads": a.threads,
              "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "setup": setup,
              "work_dir": str(work), "stages": rows, "total": tot,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(a.out) if a.out else PROJECT / "bench" / "results" / \
        f"pipeline-{a.backend}{'-tiny' if a.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    hdr = f"{'stage':<10}{'wall':>8}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'overhead':>10}{'cpu':>8}{'procs':>6}"
    print(f"seconds; {a.backend} backend{' (tiny)' if a.tiny else ''}; overhead = wall - compute; "
          "cpu = CPU seconds of the stage's whole process tree (Ray's included, unless\n"
          "a reused cluster's), procs = processes in it")
    print(hdr)
    for r in [*rows, {"stage": "total", **tot}]:
        print(f"{r['stage']:<10}{r.get('wall', 0):>8.2f}" + "".join(f"{r.get(c, 0):>10.2f}" for c in COLUMNS)
              + f"{r.get('overhead', 0):>10.2f}{r.get('cpu', 0):>8.1f}{r.get('processes', 0):>6.0f}")
    print(f"setup (untimed per stage): {setup}; logs: {log_dir}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
