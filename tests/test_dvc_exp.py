"""`dvc exp` on one machine, in a real git + DVC repository: two queued experiments
(`dvc exp run --queue -S`), run by `dvc queue start -j 2`, each carry the evaluation's flat summary
(the git-tracked metrics file dvc.yaml declares), readable from `dvc exp show --json`; each
experiment is one MLflow parent run, in the workspace's default `mlflow.db` (not in the temporary
copy DVC runs queued experiments in)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"kind": "toy", "name": "8gaussians", "n_train": 1000, "n_test": 300},
    "stages": {
        "teacher": {"kind": "teacher", "method": {"name": "edm"},
                    "network": {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16},
                    "train": {"steps": 30, "batch_size": 64, "log_every": 10}},
        "cd": {"kind": "distill", "inputs": {"teacher": "teacher"}, "method": {"name": "cd", "N": 8},
               "train": {"steps": 10, "batch_size": 64, "log_every": 5}},
        "eval": {"kind": "evaluate", "inputs": {"models": ["teacher", "cd"]},
                 "evaluate": {"n_samples": 64, "seeds": [0], "nfe": [1], "teacher_nfe": [3], "plots": False}},
    },
    "compute": {"backend": "local", "threads": 1},
}


def test_queued_experiments_carry_metrics_and_one_mlflow_run_each(tmp_path, mlflow_template, stage_forkserver):
    from mlflow import MlflowClient

    d = tmp_path / "repo"
    for sub in ("fastgen_core", "stages", "flows"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (d / "params").mkdir()
    (d / "params/tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))  # default MLflow store
    shutil.copy(mlflow_template, d / "mlflow.db")
    (d / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlruns/\n__pycache__/\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(d),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    for k in ("FASTGEN_INVOCATION", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    # the stage commands in children of a warm interpreter (tests/forkserver.py): tests/test_dvc.py
    # and tests/test_faults.py run them as plain processes
    env = stage_forkserver(env)

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    sh(sys.executable, "-m", "stages.dvcgen")
    assert json.loads((d / "metrics/tiny-eval.json").read_text()) == {}  # not run yet: an empty summary
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    shown = subprocess.run(["dvc", "metrics", "show"], cwd=d, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "failed" not in (shown.stdout + shown.stderr).lower(), shown

    for n in (6, 10):
        sh("dvc", "exp", "run", "--queue", "-n", f"n{n}", "-S", f"params/tiny.yaml:stages.cd.method.N={n}")
    sh("dvc", "queue", "start", "-j", "2")
    t0 = time.time()
    while time.time() - t0 < 300:
        status = sh("dvc", "queue", "status")
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, (status, sh("dvc", "queue", "logs", "n6")[-3000:])

    exps = {}
    for base in json.loads(sh("dvc", "exp", "show", "--json")):
        for e in base.get("experiments") or []:
            for rev in e["revs"]:
                exps[rev["name"]] = rev["data"]
    assert set(exps) == {"n6", "n10"}
    for name, data in exps.items():
        summary = data["metrics"]["metrics/tiny-eval.json"]["data"]
        assert summary["metric"] == "swd" and summary["best_1nfe"] == "cd", summary
        assert summary["teacher"] == "teacher"
        # the summary's figures hang together (each rounded to 4 significant digits): above floor is the
        # mean less the floor, the ratio that over the teacher's
        above = summary["best_1nfe_mean"] - summary["floor"]
        assert summary["best_1nfe_above_floor"] == pytest.approx(above, rel=2e-3, abs=2e-4), summary
        assert summary["best_1nfe_ratio"] == pytest.approx(above / summary["teacher_above_floor"], rel=5e-3), summary
        assert data["params"]["params/tiny.yaml"]["data"]["stages"]["cd"]["method"]["N"] == int(name[1:])
    # the two students differ, so their summaries do
    assert exps["n6"]["metrics"] != exps["n10"]["metrics"]

    # MLflow: in the workspace's store, one parent run per experiment with its three stage runs
    client = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags.get("fastgen.level") == "pipeline"]
    assert sorted(r.data.tags["fastgen.dvc_exp"] for r in parents) == ["n10", "n6"]
    for p in parents:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        assert sorted(r.data.tags["fastgen.stage"] for r in kids) == ["cd", "eval", "teacher"]
    assert not list((d / ".dvc").rglob("mlflow.db"))
