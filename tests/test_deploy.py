"""Deployments and sweeps through a real Prefect server and a real process worker.

A throwaway copy of the project (the code, one tiny recipe `params/tiny.yaml`, and the
`prefect.yaml` that `python -m stages.dvcgen` generates from it) gets its own `prefect server` on
127.0.0.1 (own PREFECT_HOME, free port), the two work pools, `prefect deploy --all` run from its
root as a user would, and a `prefect worker` of the process pool. Then:

- the recipe's deployment runs with one override: the flow run completes, the outputs carry the
  override in their params digests, the deployment's schedule exists and is inactive, and its
  parameter form has exactly the three fields (recipe, overrides, force);
- a 2 × 2 sweep (`fastgen sweep`) runs four trials as deployment runs on that worker, and is
  killed mid-way with its worker (SIGKILL to the worker, every flow run below it and the sweep)
  once a trial has completed and another is executing a stage. Prefect leaves the killed runs
  Running. The sweep rerun with a fresh worker does not resubmit the completed trials, sets the
  killed runs Crashed once they have been silent (no heartbeat, no event) past its limit and submits
  them again, and the stage killed mid-way runs again (its half-made output unused, its MLflow run
  KILLED). Then all four trials verify, the stages shared by every trial (teacher, ODE pairs) ran
  once, MLflow holds one sweep run with four finished trial runs tagged with their overrides and
  their stage runs, and the same sweep run again submits nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from servers import free_port, prefect_env, start, stop, wait_http

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"kind": "toy", "name": "8gaussians", "n_train": 1000, "n_test": 300},
    "stages": {
        "teacher": {"kind": "teacher", "method": {"name": "edm"},
                    "network": {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16},
                    "train": {"steps": 40, "batch_size": 64, "log_every": 20}},
        "pairs": {"kind": "ode_pairs", "inputs": {"teacher": "teacher"}, "pairs": {"n_pairs": 64, "steps": 4}},
        "cd": {"kind": "distill", "inputs": {"teacher": "teacher"}, "method": {"name": "cd", "N": 8},
               "train": {"steps": 10, "batch_size": 64, "log_every": 5}},
        "eval": {"kind": "evaluate", "inputs": {"models": ["teacher", "cd"], "pairs": "pairs"},
                 "evaluate": {"n_samples": 64, "seeds": [0], "nfe": [1], "teacher_nfe": [3], "plots": False}},
    },
    "compute": {"backend": "local", "threads": 1},
}
OVERRIDE = {"stages.cd.method.N": 6}
GRID = ["-S", "stages.cd.method.N=6,10", "-S", "stages.cd.train.lr=1e-3,5e-4"]


def api(base: str, path: str, body: dict | None = None) -> dict:
    """One call of the server's REST API; a 503 (the server's "retry": its SQLite busy, e.g. on a
    loaded machine) is retried as Prefect's own client retries it."""
    req = urllib.request.Request(f"{base}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    for attempt in range(6):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 5:
                raise
            time.sleep(1 + attempt)


def wait_run(base: str, run_id: str, timeout: float = 300) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        fr = api(base, f"/flow_runs/{run_id}")
        if fr["state"] and fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return fr
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout:.0f}s: {fr['state']}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlflow_template):
    d = tmp_path_factory.mktemp("deploy")
    for sub in ("fastgen_core", "stages", "flows"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (d / "params").mkdir()
    (d / "params/tiny.yaml").write_text(yaml.safe_dump({**TINY, "tracking": {"uri": f"sqlite:///{d / 'mlflow.db'}"}},
                                                       sort_keys=False))
    shutil.copy(mlflow_template, d / "mlflow.db")
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    env = prefect_env(d, base)

    def sh(*cmd, check=True):
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        if check:
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    sh(sys.executable, "-m", "stages.dvcgen")  # writes prefect.yaml for params/tiny.yaml
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   d / "server.log", env)
    workers: list = []

    def start_worker():
        log = d / ("worker.log" if not workers else f"worker{len(workers) + 1}.log")
        workers.append(start([str(BIN / "prefect"), "worker", "start", "--pool", "fastgen-process", "--limit", "4"],
                             log, env))

    try:
        wait_http(f"{base}/health", server, d / "server.log", timeout=180)
        for pool in ("fastgen-process", "fastgen-sweeps"):
            sh(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
        deployed = sh(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
        start_worker()
        yield SimpleNamespace(root=d, base=base, env=env, sh=sh, deployed=deployed.stdout + deployed.stderr,
                              worker_log=d / "worker.log", workers=workers, start_worker=start_worker)
    finally:
        for w in workers:  # every flow run has ended; a worker given SIGTERM took the whole 15 s grace
            if w.poll() is None:
                kill_tree(w)
        stop(server)


def _digests(root: Path, recipe: str) -> dict[str, str]:
    return {s: json.loads((root / recipe / s / "manifest.json").read_text())["params_digest"] for s in TINY["stages"]}


def test_deployment_runs_with_an_override(cluster):
    from stages.sweep import load_with_overrides

    dep = api(cluster.base, "/deployments/name/fastgen/tiny")
    schema = dep["parameter_openapi_schema"]
    size = len(json.dumps(schema))
    print(f"\nparameter schema of fastgen/tiny: {size} bytes, fields {sorted(schema['properties'])}")
    assert sorted(schema["properties"]) == ["force", "overrides", "recipe"]
    assert size < 3000, size  # a small form, not a whole recipe
    # the recipe field is a choice of the files in params/
    recipe_field = json.dumps(schema["properties"]["recipe"]) + json.dumps(schema.get("definitions", {}))
    assert '"tiny"' in recipe_field
    # the declared schedule exists and is off until a user switches it on
    assert len(dep["schedules"]) == 1
    sched = dep["schedules"][0]
    assert sched["active"] is False and sched["schedule"]["cron"] == "0 3 * * *"

    fr = api(cluster.base, f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"overrides": OVERRIDE}})
    done = wait_run(cluster.base, fr["id"])
    assert done["state"]["type"] == "COMPLETED", (done["state"], cluster.worker_log.read_text()[-3000:])
    assert done["parameters"] == {"recipe": "tiny", "overrides": OVERRIDE}

    path = str(cluster.root / "params/tiny.yaml")
    want, base = load_with_overrides(path, OVERRIDE), load_with_overrides(path)
    got = _digests(cluster.root / "outputs", "tiny")
    assert got == {s: want.digest(s) for s in TINY["stages"]}
    assert got["cd"] != base.digest("cd") and got["teacher"] == base.digest("teacher")


def test_a_bad_override_fails_before_any_stage_runs(cluster):
    dep = api(cluster.base, "/deployments/name/fastgen/tiny")
    fr = api(cluster.base, f"/deployments/{dep['id']}/create_flow_run",
             {"parameters": {"overrides": {"stages.cd.method.N": "many"}}})
    done = wait_run(cluster.base, fr["id"])
    assert done["state"]["type"] == "FAILED"
    assert "stages.cd.method.N" in done["state"]["message"], done["state"]["message"]
    tasks = api(cluster.base, "/task_runs/filter", {"flow_runs": {"id": {"any_": [fr["id"]]}}})
    assert tasks == []  # no stage task was started


def _below(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        below = kids.get(todo.pop(), [])
        out += below
        todo += below
    return out


def kill_tree(proc) -> None:
    """SIGKILL a process started by `servers.start`, its process group and every process below it
    (Prefect's process worker starts each flow run in a session of its own): a machine lost at once."""
    os.killpg(proc.pid, signal.SIGSTOP)  # the worker starts nothing more while its tree is read
    below = _below(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        for kill in (lambda: os.killpg(os.getpgid(pid), signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def _t(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _status(client, run_id: str) -> str | None:
    try:
        return client.get_run(run_id).info.status
    except Exception:  # noqa: BLE001  (the store busy with the stopped process's write: not now)
        return None


def _lock_facts(lock: Path) -> dict:
    """What a stage lock's holder recorded: its pid, and the MLflow run id once it executes the stage."""
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def test_sweep_over_the_work_pool_survives_a_killed_worker(cluster, monkeypatch):
    from mlflow import MlflowClient

    from fastgen_core import artifacts
    from stages.report import sweep_report

    dep = {"deployments": {"id": {"any_": [api(cluster.base, "/deployments/name/fastgen/tiny")["id"]]}}}
    n_runs = api(cluster.base, "/flow_runs/count", dep)  # runs of the recipe's deployment
    trial_filter = {**dep, "flow_runs": {"tags": {"all_": ["fastgen-sweep"]}}}
    monkeypatch.chdir(cluster.root)

    # the sweep, three trials at a time; once a trial has completed and another is executing a stage
    # (its stage lock names the stage's MLflow run), that process is stopped where it is, and the
    # worker, every flow run below it and the sweep itself are killed with SIGKILL
    first = start([sys.executable, "-m", "stages.cli", "sweep", "tiny", *GRID, "--max-parallel", "3"],
                  cluster.root / "sweep1.log", cluster.env)
    locks = cluster.root / "outputs/sweeps"
    client = MlflowClient(f"sqlite:///{cluster.root / 'mlflow.db'}")
    states, asked, t0 = {}, 0.0, time.time()
    while True:
        assert first.poll() is None, f"the sweep ended before the kill:\n{(cluster.root / 'sweep1.log').read_text()}"
        assert time.time() - t0 < 300, ("no trial completed while another ran a stage", states)
        if time.time() - asked > 0.5:
            states, asked = {r["idempotency_key"]: r["state"]["type"]
                             for r in api(cluster.base, "/flow_runs/filter", trial_filter)}, time.time()
        held = {lk: _lock_facts(lk) for lk in locks.glob("*/*/tiny/.partial/*.lock")} if locks.exists() else {}
        busy = [(lk, f) for lk, f in held.items() if f.get("run_id")]
        if "COMPLETED" in states.values() and busy:
            lk, facts = busy[0]
            os.kill(facts["pid"], signal.SIGSTOP)  # mid-stage, unless it finished since the lock was read
            if _lock_facts(lk).get("run_id") == facts["run_id"] and _status(client, facts["run_id"]) == "RUNNING":
                break
            os.kill(facts["pid"], signal.SIGCONT)
        time.sleep(0.05)
    kill_tree(cluster.workers[-1])
    kill_tree(first)
    killed_at = time.time()
    at_kill = {r["idempotency_key"]: r for r in api(cluster.base, "/flow_runs/filter", trial_filter)}
    done_then = {k for k, r in at_kill.items() if r["state"]["type"] == "COMPLETED"}
    stuck = {k for k, r in at_kill.items() if r["state"]["type"] in ("RUNNING", "PENDING")}
    assert done_then and "RUNNING" in {at_kill[k]["state"]["type"] for k in stuck}, \
        {k: r["state"]["type"] for k, r in at_kill.items()}
    # Prefect leaves the killed runs Running (or Pending): nothing marks them on a self-hosted server
    time.sleep(1)
    assert all(api(cluster.base, f"/flow_runs/{at_kill[k]['id']}")["state"]["type"] in ("RUNNING", "PENDING")
               for k in stuck)
    # a stage was killed mid-way: its lock is left, naming its MLflow run
    left = {lk: _lock_facts(lk).get("run_id") for lk in locks.glob("*/*/tiny/.partial/*.lock")}
    assert left.get(lk) == facts["run_id"], (facts, left)
    killed = {lk: run for lk, run in left.items() if run}

    # rerun with a fresh worker: finished trials are found, the lost ones (silent for 35 s) are set
    # Crashed and submitted again, the others are submitted
    cluster.start_worker()
    r = cluster.sh(sys.executable, "-m", "stages.cli", "sweep", "tiny", *GRID, "--lost-after", "35", check=False)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:], (cluster.root / "worker2.log").read_text()[-3000:])
    assert r.stdout.count("COMPLETED") == 4, r.stdout
    after = {x["idempotency_key"]: x for x in api(cluster.base, "/flow_runs/filter", trial_filter)}
    for k in done_then:  # not resubmitted
        assert not any(o.startswith(f"{k}/retry") for o in after), sorted(after)
    for k in stuck:  # set Crashed by the sweep, saying why, and run again under the next key
        assert after[k]["state"]["type"] == "CRASHED" and after[k]["state"]["message"].startswith("lost: "), after[k]
        # ... once it had been silent for the limit: no event of the run (its heartbeats, its stages'
        # states) in the 35 s before it was set Crashed
        crashed_at = _t(after[k]["state"]["timestamp"])
        events = api(cluster.base, "/events/filter", {"filter": {"any_resource": {
            "id": [f"prefect.flow-run.{after[k]['id']}"]}}, "limit": 50})["events"]
        if at_kill[k]["state"]["type"] == "RUNNING":  # a Pending run (its process not started yet) sends none
            assert "prefect.flow-run.heartbeat" in {e["event"] for e in events}
        heard = max(_t(e["occurred"]) for e in events if _t(e["occurred"]) < crashed_at - 1)
        assert heard <= killed_at + 1 and crashed_at - heard > 35, (heard, killed_at, crashed_at)
        assert after[f"{k}/retry1"]["state"]["type"] == "COMPLETED"
    assert api(cluster.base, "/flow_runs/count", dep) == n_runs + 4 + len(stuck)
    assert sum(x["state"]["type"] == "COMPLETED" for x in after.values()) == 4

    sweeps = list((cluster.root / "outputs/sweeps").iterdir())
    assert len(sweeps) == 1
    trials = sorted(p for p in sweeps[0].iterdir() if not p.name.startswith("."))
    assert len(trials) == 4
    manifests = {t.name: {s: artifacts.verify(t / "tiny" / s) for s in TINY["stages"]} for t in trials}
    # the student differs in every trial; the teacher and the pairs were made once and reused
    assert len({m["cd"]["params_digest"] for m in manifests.values()}) == 4
    for s in ("teacher", "pairs"):
        made = {(m[s]["digest"], m[s]["created"], m[s]["mlflow"]["run_id"]) for m in manifests.values()}
        assert len(made) == 1, (s, made)
    for t, m in manifests.items():  # each evaluation read the student that is there now
        assert m["eval"]["inputs"]["cd"]["digest"] == m["cd"]["digest"], t
    # the killed stage's half-made output was not used: the stage ran again under another run
    for lk, run in killed.items():
        trial, stage = lk.parents[2].name, lk.stem
        assert manifests[trial][stage]["mlflow"]["run_id"] != run
        assert client.get_run(run).info.status == "KILLED"
        assert not lk.exists() and not list(lk.parents[1].glob(f".{stage}.*"))  # no leftovers

    table = sweep_report(sweeps[0]).splitlines()  # `fastgen report <sweep folder>`: one row per trial
    assert table[0] == f"sweep {sweeps[0].name}: 4 evaluated trial(s)"
    assert sorted(line.split()[0] for line in table[4:]) == sorted(t.name.split("-")[0] for t in trials)

    exp = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    sweep_runs = [x for x in runs if x.data.tags.get("fastgen.level") == "sweep"]
    assert len(sweep_runs) == 1 and sweep_runs[0].info.status == "FINISHED"
    sid = sweep_runs[0].info.run_id
    trial_runs = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == sid]
    finished = [x for x in trial_runs if x.info.status == "FINISHED"]
    assert len(finished) == 4 and all(x.data.tags["fastgen.level"] == "pipeline" for x in trial_runs)
    grids = {(o["stages.cd.method.N"], o["stages.cd.train.lr"])
             for o in (json.loads(x.data.tags["fastgen.overrides"]) for x in finished)}
    assert grids == {(6, 1e-3), (6, 5e-4), (10, 1e-3), (10, 5e-4)}
    # every stage output was made by one finished stage run: each trial's student and evaluation,
    # and the shared stages once, by whichever trial reached them first
    ids = {x.info.run_id for x in trial_runs}
    made = [(y.data.tags["fastgen.output"], y.data.tags["fastgen.stage"]) for y in runs
            if y.data.tags.get("mlflow.parentRunId") in ids and y.info.status == "FINISHED"]
    assert sorted(s for _, s in made) == sorted(["cd", "eval"] * 4 + ["pairs", "teacher"]), made
    assert len(set(made)) == len(made)

    # the same sweep again: every trial is found finished, nothing is submitted
    n_after = api(cluster.base, "/flow_runs/count", dep)
    again = cluster.sh(sys.executable, "-m", "stages.cli", "sweep", "tiny", *GRID, check=False)
    assert again.returncode == 0 and again.stdout.count("COMPLETED") == 4, again.stderr[-2000:]
    assert api(cluster.base, "/flow_runs/count", dep) == n_after
