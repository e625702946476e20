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


def _shrink_train(t: dict) -> None:
    t["steps"] = min(t.get("steps", 2000), 8)
    t["batch_size"] = min(t.get("batch_size", 256), 64)
    t.update(log_every=4, ckpt_every=1000)
    if t.get("lr_warmup"):
        t["lr_warmup"] = 2
    if "snapshots" in t:
        t["snapshots"] = [min(s, 4) for s in t["snapshots"]]


def _shrink_settings(node: dict) -> None:
    """Training and pair-solving settings anywhere in a stage's settings: a group kind (rounds,
    students) nests them (e.g. a students group's `tsm.train`)."""
    for key, v in node.items():
        if not isinstance(v, dict):
            continue
        if key == "train":
            _shrink_train(v)
        elif key == "pairs":
            v.update(n_pairs=64, steps=min(v.get("steps", 18), 4))
        else:
            _shrink_settings(v)


def shrink(raw: dict) -> dict:
    """The same recipe at a size that runs in seconds (see module docstring)."""
    r = copy.deepcopy(raw)
    data = r.setdefault("data", {})
    if data.get("kind", "toy") == "toy":
        data["n_train"], data["n_test"] = min(data.get("n_train", 20000), 1000), min(data.get("n_test", 5000), 300)
    for spec in r["stages"].values():
        if spec.get("kind") in ("teacher", "distill", "feature_net", "weak_snapshot"):
            spec.setdefault("train", {})  # only training kinds take `train`
        _shrink_settings(spec)
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


def write_shrunk(folder: Path, storage_root: str, tracking: dict, recipe: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = shrink(yaml.safe_load(recipe.read_text()))
    raw["storage"] = {"root": storage_root}
    raw["tracking"] = tracking
    p = folder / recipe.name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


# One recipe's runs are cached per test process: under pytest-xdist every test of a recipe runs on
# the same worker (its xdist_group), so the flow and `dvc repro` run once per recipe, and recipes
# spread over the workers.
_FLOW: dict[str, tuple] = {}
_DVC: dict[str, tuple] = {}
PER_RECIPE = [pytest.param(f, id=f.stem, marks=pytest.mark.xdist_group(f"recipe-{f.stem}")) for f in RECIPES]


def flow_run(recipe: Path, tmp_path_factory, mlflow_template) -> tuple:
    """The shrunk recipe through the Prefect flow, with its own MLflow store."""
    if recipe.stem not in _FLOW:
        from flows.pipeline import pipeline

        root = tmp_path_factory.mktemp(f"flow-{recipe.stem}")
        shutil.copy(mlflow_template, root / "mlflow.db")
        p = write_shrunk(root / "params", str(root / "outputs"), {"uri": f"sqlite:///{root / 'mlflow.db'}"}, recipe)
        saved = os.environ.pop("FASTGEN_INVOCATION", None)
        try:
            _FLOW[recipe.stem] = (root, p, pipeline(load_recipe(p), recipe_path=str(p)))
        finally:
            if saved is not None:
                os.environ["FASTGEN_INVOCATION"] = saved
    return _FLOW[recipe.stem]


def dvc_repo(recipe: Path, tmp_path_factory) -> tuple:
    """The shrunk recipe in its own git + DVC repository, `dvc repro` once (tracking off: MLflow is
    tested elsewhere and costs seconds per stage process)."""
    if recipe.stem not in _DVC:
        d = tmp_path_factory.mktemp(f"dvc-{recipe.stem}")
        for sub in ("fastgen_core", "stages", "flows"):
            shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
        p = write_shrunk(d / "params", "outputs", {"enabled": False}, recipe)
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
        _DVC[recipe.stem] = (d, p, sh, sh("dvc", "repro"))
    return _DVC[recipe.stem]


def test_every_recipe_validates_and_is_in_dvc_yaml():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for f in RECIPES:
        r = load_recipe(f)
        assert all(f"{r.name}-{s}" in dvc for s in r.stages), f.name


@pytest.mark.parametrize("recipe", PER_RECIPE)
def test_recipe_runs_through_the_flow(recipe, prefect_harness, tmp_path_factory, mlflow_template):
    from mlflow import MlflowClient

    root, p, results = flow_run(recipe, tmp_path_factory, mlflow_template)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    r = load_recipe(p)
    assert list(results) == r.order()
    for s in r.stages:
        m = artifacts.verify(stage_dir(r, s))
        assert m["digest"] == results[s]["digest"] and m["mlflow"]["run_id"], s
    exp = client.get_experiment_by_name(r.name)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(x.data.tags.get("fastgen.stage", "") for x in runs if x.data.tags.get("fastgen.level") == "stage") \
        == sorted(r.stages)
    assert all(x.info.status == "FINISHED" for x in runs)


@pytest.mark.parametrize("recipe", PER_RECIPE)
def test_recipe_runs_through_dvc_repro_identically(recipe, prefect_harness, tmp_path_factory, mlflow_template):
    d, p, sh, first = dvc_repo(recipe, tmp_path_factory)
    _, _, results = flow_run(recipe, tmp_path_factory, mlflow_template)
    r = load_recipe(p)
    assert set(re.findall(r"Running stage '([^']+)'", first)) == {f"{r.name}-{s}" for s in r.stages}
    for s, res in results.items():
        m = artifacts.verify(d / "outputs" / r.name / s)
        # same code, same params, same seeds: DVC's stage processes and the flow's tasks agree bit for bit
        assert m["digest"] == res["digest"], f"{r.name}/{s}: dvc and flow outputs differ"
    assert not re.findall(r"Running stage", sh("dvc", "repro"))


def _tangent_users(d: Path) -> set[str]:
    """Method modules importing fastgen_core/tangents.py, read from their sources (not from dvc.yaml)."""
    return {f.stem for f in (d / "fastgen_core/methods").glob("*.py")
            if re.search(r"^\s*from \.\.tangents import|^\s*from \.\. import .*\btangents\b", f.read_text(), re.M)}


@pytest.mark.parametrize("recipe", [p for p in PER_RECIPE if p.id in ("toy_scd", "toy_cd")])
def test_dvc_repro_after_touching_a_helper_reruns_exactly_its_users(recipe, tmp_path_factory):
    """Editing fastgen_core/tangents.py (a comment: the outputs stay bit-identical) reruns exactly
    the stages that train or sample with a method whose module imports it: all of sCD's stages that
    do, none of toy_cd's."""
    d, p, sh, _ = dvc_repo(recipe, tmp_path_factory)
    users = _tangent_users(d)
    assert users, "no method module imports tangents.py"
    r = load_recipe(p)
    expected = {f"{r.name}-{s}" for s in r.stages if {r.model_method(x) for x in [s, *r.upstream(s)]} & users}
    assert bool(expected) == (recipe.stem == "toy_scd")
    helper = d / "fastgen_core/tangents.py"
    original = helper.read_text()
    helper.write_text(original + "\n# touched by the test\n")
    try:
        ran = set(re.findall(r"Running stage '([^']+)'", sh("dvc", "repro")))
    finally:
        helper.write_text(original)
    assert ran == expected
