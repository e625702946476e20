"""Deployments and sweeps through a real Prefect server and a real process worker.

A throwaway copy of the project (the code, one tiny recipe `params/tiny.yaml`, and the
`prefect.yaml` that `python -m stages.dvcgen` generates from it) gets its own `prefect server` on
127.0.0.1 (own PREFECT_HOME, free port), the two work pools, `prefect deploy --all` run from its
root as a user would, and a `prefect worker` of the process pool. Then:

- the recipe's deployment runs with one override: the flow run completes, the outputs carry the
  override in their params digests, the deployment's schedule exists and is inactive, and its
  parameter form has exactly the three fields (recipe, overrides, force);
- a 2 × 2 sweep (`fastgen sweep`) runs four trials as deployment runs on that worker: all complete
  and verify, the stages shared by every trial (teacher, ODE pairs) ran once, MLflow holds one sweep
  run with four nested trial runs tagged with their overrides and their stage runs; the same sweep
  run again submits nothing, and after one trial's run is marked Crashed (as a killed worker leaves
  it) it resubmits that trial only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
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
    req = urllib.request.Request(f"{base}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


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
    worker = None
    try:
        wait_http(f"{base}/health", server, d / "server.log", timeout=180)
        for pool in ("fastgen-process", "fastgen-sweeps"):
            sh(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
        deployed = sh(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
        worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "fastgen-process", "--limit", "4"],
                       d / "worker.log", env)
        yield SimpleNamespace(root=d, base=base, env=env, sh=sh, deployed=deployed.stdout + deployed.stderr,
                              worker_log=d / "worker.log")
    finally:
        if worker is not None:
            stop(worker)
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


def test_sweep_over_the_work_pool(cluster, monkeypatch):
    from mlflow import MlflowClient

    from fastgen_core import artifacts
    from stages.report import sweep_report

    dep = {"deployments": {"id": {"any_": [api(cluster.base, "/deployments/name/fastgen/tiny")["id"]]}}}
    n_runs = api(cluster.base, "/flow_runs/count", dep)  # runs of the recipe's deployment
    r = cluster.sh(sys.executable, "-m", "stages.cli", "sweep", "tiny", *GRID, "--max-parallel", "4", check=False)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:], cluster.worker_log.read_text()[-3000:])
    assert r.stdout.count("COMPLETED") == 4, r.stdout
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

    monkeypatch.chdir(cluster.root)  # `fastgen report <sweep folder>`: one row per trial
    table = sweep_report(sweeps[0]).splitlines()
    assert table[0] == f"sweep {sweeps[0].name}: 4 evaluated trial(s)"
    assert sorted(line.split()[0] for line in table[4:]) == sorted(t.name.split("-")[0] for t in trials)

    client = MlflowClient(f"sqlite:///{cluster.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    sweep_runs = [x for x in runs if x.data.tags.get("fastgen.level") == "sweep"]
    assert len(sweep_runs) == 1 and sweep_runs[0].info.status == "FINISHED"
    sid = sweep_runs[0].info.run_id
    trial_runs = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == sid]
    assert len(trial_runs) == 4 and all(x.data.tags["fastgen.level"] == "pipeline" for x in trial_runs)
    grids = {(o["stages.cd.method.N"], o["stages.cd.train.lr"])
             for o in (json.loads(x.data.tags["fastgen.overrides"]) for x in trial_runs)}
    assert grids == {(6, 1e-3), (6, 5e-4), (10, 1e-3), (10, 5e-4)}
    stage_runs = {x.info.run_id: sorted(y.data.tags["fastgen.stage"] for y in runs
                                        if y.data.tags.get("mlflow.parentRunId") == x.info.run_id) for x in trial_runs}
    # every trial ran its own student and evaluation; the shared stages were run by whichever trial
    # reached them first (once each), and copied by the others
    everything = sorted(s for names in stage_runs.values() for s in names)
    assert everything == sorted(["cd", "eval"] * 4 + ["pairs", "teacher"]), stage_runs
    assert all({"cd", "eval"} <= set(names) for names in stage_runs.values()), stage_runs

    # the same sweep again: every trial is found finished, nothing is submitted
    n_after = api(cluster.base, "/flow_runs/count", dep)
    assert n_after == n_runs + 4
    again = cluster.sh(sys.executable, "-m", "stages.cli", "sweep", "tiny", *GRID, check=False)
    assert again.returncode == 0 and again.stdout.count("COMPLETED") == 4, again.stderr[-2000:]
    assert api(cluster.base, "/flow_runs/count", dep) == n_after

    # one trial's run ends Crashed (as when its worker is killed): a rerun resubmits that trial only
    trial_runs_ = {**dep, "flow_runs": {"tags": {"all_": ["fastgen-sweep"]}}}
    crashed = api(cluster.base, "/flow_runs/filter", {**trial_runs_, "limit": 1})[0]
    api(cluster.base, f"/flow_runs/{crashed['id']}/set_state",
        {"state": {"type": "CRASHED", "message": "worker killed (test)"}, "force": True})
    third = cluster.sh(sys.executable, "-m", "stages.cli", "sweep", "tiny", *GRID, check=False)
    assert third.returncode == 0 and third.stdout.count("COMPLETED") == 4, third.stderr[-2000:]
    assert api(cluster.base, "/flow_runs/count", dep) == n_after + 1
    resubmitted = api(cluster.base, "/flow_runs/filter", {**trial_runs_, "sort": "EXPECTED_START_TIME_DESC",
                                                          "limit": 1})[0]
    assert resubmitted["idempotency_key"].endswith("/retry1") and resubmitted["state"]["type"] == "COMPLETED"
    assert resubmitted["idempotency_key"].rsplit("/", 1)[0] == crashed["idempotency_key"]
