"""Every shipped recipe (params/*.yaml), shrunk to a tiny size, runs end to end through BOTH the
Prefect flow (Prefect's test harness) and `dvc repro` (a real git + DVC repository in a temp dir),
and the two give bit-identical artifacts stage by stage.

Shrinking keeps each recipe's stage graph, methods and method settings and cuts only sizes:
training steps and batch sizes, pair counts, evaluation samples, seeds and NFEs. Adding a recipe to
params/ adds it to this test with no code change.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastgen_core import artifacts
from stages.recipe import load_recipe
from stages.runtime import stage_dir

ROOT = Path(__file__).resolve().parent.parent
# FASTGEN_TEST_RECIPES=toy_cd,toy_ayf narrows the run while developing a recipe
RECIPES = [f for f in sorted((ROOT / "params").glob("*.yaml"))
           if not os.environ.get("FASTGEN_TEST_RECIPES") or f.stem in os.environ["FASTGEN_TEST_RECIPES"].split(",")]


def shrink(raw: dict) -> dict:
    """The same recipe at a size that runs in seconds (see module docstring)."""
    r = copy.deepcopy(raw)
    data = r.setdefault("data", {})
    if data.get("kind", "toy") == "toy":
        data["n_train"], data["n_test"] = min(data.get("n_train", 20000), 1000), min(data.get("n_test", 5000), 300)
    for spec in r["stages"].values():
        if spec.get("kind") not in ("teacher", "distill", "feature_net", "weak_snapshot"):
            t = {}  # only training kinds take `train`
        else:
            t = spec.setdefault("train", {})
        t["steps"] = min(t.get("steps", 2000), 8)
        t["batch_size"] = min(t.get("batch_size", 256), 64)
        t.update(log_every=4, ckpt_every=1000)
        if t.get("lr_warmup"):
            t["lr_warmup"] = 2
        if "snapshots" in t:
            t["snapshots"] = [min(s, 4) for s in t["snapshots"]]
        if "pairs" in spec:
            spec["pairs"] = {**spec["pairs"], "n_pairs": 64, "steps": min(spec["pairs"].get("steps", 18), 4)}
        if spec.get("kind") == "evaluate":
            ev = spec.setdefault("evaluate", {})
            ev.update(n_samples=64, seeds=[0], nfe=[1, 2], teacher_nfe=[1, 3], plots=False)
        m = spec.get("method") or {}
        if "K" in m:
            m["K"] = 8
        if "step" in (spec.get("guide") or {}):  # weak_snapshot: the teacher's (shrunk) snapshot step
            spec["guide"]["step"] = 4
        if "edit" in spec:
            spec["edit"] = {**spec["edit"], "n_images": min(spec["edit"].get("n_images", 16), 8)}
    r["compute"] = {"backend": "local", "threads": 1}
    return r


def write_shrunk(folder: Path, storage_root: str, tracking: dict) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in RECIPES:
        raw = shrink(yaml.safe_load(f.read_text()))
        raw["storage"] = {"root": storage_root}
        raw["tracking"] = tracking
        p = folder / f.name
        p.write_text(yaml.safe_dump(raw, sort_keys=False))
        out.append(p)
    return out


@pytest.fixture(scope="module")
def flow_runs(prefect_harness, tmp_path_factory, mlflow_template):
    """Every shrunk recipe through the Prefect flow, one MLflow store for all."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("recipes-flow")
    shutil.copy(mlflow_template, root / "mlflow.db")
    paths = write_shrunk(root / "params", str(root / "outputs"), {"uri": f"sqlite:///{root / 'mlflow.db'}"})
    saved = os.environ.pop("FASTGEN_INVOCATION", None)
    try:
        results = {p.stem: pipeline(load_recipe(p), recipe_path=str(p)) for p in paths}
    finally:
        if saved is not None:
            os.environ["FASTGEN_INVOCATION"] = saved
    return root, paths, results


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """Every shrunk recipe in one git + DVC repository, `dvc repro` once (tracking off: MLflow is
    tested elsewhere and costs seconds per stage process)."""
    d = tmp_path_factory.mktemp("recipes-dvc")
    for sub in ("fastgen_core", "stages", "flows"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    write_shrunk(d / "params", "outputs", {"enabled": False})
    (d / ".gitignore").write_text("__pycache__/\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(d),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FASTGEN_INVOCATION", None)

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    sh(sys.executable, "-m", "stages.dvcgen")
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    first = sh("dvc", "repro")
    return d, sh, first


def test_every_recipe_validates_and_is_in_dvc_yaml():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for f in RECIPES:
        r = load_recipe(f)
        assert all(f"{r.name}-{s}" in dvc for s in r.stages), f.name


def test_every_recipe_runs_through_the_flow(flow_runs):
    from mlflow import MlflowClient

    root, paths, results = flow_runs
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for p in paths:
        r = load_recipe(p)
        assert list(results[p.stem]) == r.order(), p.name
        for s in r.stages:
            m = artifacts.verify(stage_dir(r, s))
            assert m["digest"] == results[p.stem][s]["digest"] and m["mlflow"]["run_id"], (p.name, s)
        exp = client.get_experiment_by_name(r.name)
        runs = client.search_runs([exp.experiment_id])
        assert sorted(x.data.tags.get("fastgen.stage", "") for x in runs if x.data.tags.get("fastgen.level") == "stage") \
            == sorted(r.stages), p.name
        assert all(x.info.status == "FINISHED" for x in runs), p.name


def test_every_recipe_runs_through_dvc_repro_identically(dvc_repo, flow_runs):
    d, sh, first = dvc_repo
    ran = set(re.findall(r"Running stage '([^']+)'", first))
    _, paths, results = flow_runs
    expected = {f"{load_recipe(p).name}-{s}" for p in paths for s in load_recipe(p).stages}
    assert ran == expected
    for p in paths:
        name = load_recipe(p).name
        for s, res in results[p.stem].items():
            m = artifacts.verify(d / "outputs" / name / s)
            # same code, same params, same seeds: DVC's stage processes and the flow's tasks agree bit for bit
            assert m["digest"] == res["digest"], f"{name}/{s}: dvc and flow outputs differ"
    again = sh("dvc", "repro")
    assert not re.findall(r"Running stage", again)


def test_dvc_repro_after_touching_a_helper_reruns_exactly_its_users(dvc_repo):
    """Editing fastgen_core/tangents.py (a comment: the outputs stay bit-identical) reruns exactly
    the stages that train or sample with a method whose module imports it, found here by reading
    the method sources, not from dvc.yaml."""
    d, sh, _ = dvc_repo
    users = {f.stem for f in (d / "fastgen_core/methods").glob("*.py")
             if re.search(r"^\s*from \.\.tangents import|^\s*from \.\. import .*\btangents\b", f.read_text(), re.M)}
    assert users, "no method module imports tangents.py"
    expected = set()
    for p in sorted((d / "params").glob("*.yaml")):
        r = load_recipe(p)
        for s in r.stages:
            if {r.model_method(x) for x in [s, *r.upstream(s)]} & users:
                expected.add(f"{r.name}-{s}")
    helper = d / "fastgen_core/tangents.py"
    original = helper.read_text()
    helper.write_text(original + "\n# touched by the test\n")
    try:
        ran = set(re.findall(r"Running stage '([^']+)'", sh("dvc", "repro")))
    finally:
        helper.write_text(original)
    assert ran == expected
