"""The Prefect flow (flows/pipeline.py) against the stage-by-stage run `dvc repro` does.

The tiny recipe runs once through the flow (under Prefect's test harness: a throwaway API server
and database) and once through `stages.runtime.run_stage` per stage (the `stagewise_run` fixture),
each into its own storage root and MLflow store. Training runs on CPU, single-threaded, with every
random draw seeded (network init included), so the two must agree bit for bit: the same files per
stage and the same content digests. A second flow run must skip every stage.
"""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from fastgen_core import artifacts
from stages.recipe import load_recipe
from stages.runtime import TIMING_PREFIX, stage_dir

STAGES = ["teacher", "pairs", "cd", "eval"]
EXPECTED_FILES = {
    "teacher": {"model.safetensors", "model.json"},
    "pairs": {"pairs.npz"},
    "cd": {"model.safetensors", "model.json"},
    "eval": {"metrics.json", "plots/quality_vs_nfe.png", "plots/samples.png",
             *{f"samples/teacher_nfe{k}.npz" for k in (1, 35)}, *{f"samples/cd_nfe{k}.npz" for k in (1, 2)}},
}


def _run_flow(recipe_path):
    from flows.pipeline import pipeline

    saved = os.environ.pop("FASTGEN_INVOCATION", None)  # the flow makes its own invocation
    try:
        t = time.perf_counter()
        result = pipeline(load_recipe(recipe_path), recipe_path=str(recipe_path))
        return result, time.perf_counter() - t
    finally:
        if saved is not None:
            os.environ["FASTGEN_INVOCATION"] = saved


@pytest.fixture(scope="module")
def flow_run(prefect_harness, tiny_recipe_session):
    path = tiny_recipe_session("flow")
    result, wall = _run_flow(path)
    recipe = load_recipe(path)
    return SimpleNamespace(path=path, recipe=recipe, result=result, wall=wall)


def _snapshot(recipe) -> dict[str, tuple[bytes, int]]:
    out = {}
    for s in recipe.order():
        m = stage_dir(recipe, s) / artifacts.MANIFEST
        out[s] = (m.read_bytes(), m.stat().st_mtime_ns)
    return out


def test_flow_runs_every_stage_in_order(flow_run):
    assert list(flow_run.result) == STAGES
    for s in STAGES:
        m = artifacts.verify(stage_dir(flow_run.recipe, s))  # files match their manifest
        assert flow_run.result[s]["digest"] == m["digest"]
        assert set(m["files"]) == EXPECTED_FILES[s], s
        assert m["params_digest"] == flow_run.recipe.digest(s)
    # each consumer recorded the digest of exactly the upstream output it used
    ev = artifacts.read_manifest(stage_dir(flow_run.recipe, "eval"))
    assert {k: v["digest"] for k, v in ev["inputs"].items()} == \
        {s: flow_run.result[s]["digest"] for s in ("teacher", "cd", "pairs")}


def test_flow_outputs_identical_to_stagewise_run(flow_run, stagewise_run):
    assert flow_run.path.parent != stagewise_run.root  # two independent storage roots
    for s in STAGES:
        a = artifacts.read_manifest(stage_dir(flow_run.recipe, s))
        b = artifacts.read_manifest(stage_dir(stagewise_run.recipe, s))
        assert set(a["files"]) == set(b["files"]), s
        assert a["params_digest"] == b["params_digest"], s
        # bit-identical content: models, pair set, samples, metrics and even the PNG plots
        for f in sorted(a["files"]):
            assert a["files"][f] == b["files"][f], f"{s}/{f} differs between flow and run_stage"
        assert a["digest"] == b["digest"] == stagewise_run.manifests[s]["digest"]
    ma = json.loads((stage_dir(flow_run.recipe, "eval") / "metrics.json").read_text())
    mb = json.loads((stage_dir(stagewise_run.recipe, "eval") / "metrics.json").read_text())
    assert ma == mb
    assert flow_run.result["eval"]["metrics"] == stagewise_run.manifests["eval"]["metrics"]
    # and the numbers are not degenerate: the teacher improves with more NFE, and the 1-step
    # student beats the teacher's single Euler step
    assert ma["teacher"]["nfe_35"]["swd"]["mean"] < 0.5 * ma["teacher"]["nfe_1"]["swd"]["mean"]
    assert ma["cd"]["nfe_1"]["swd"]["mean"] < ma["teacher"]["nfe_1"]["swd"]["mean"]


def test_flow_makes_one_parent_run_with_a_child_per_stage(flow_run):
    from mlflow import MlflowClient

    client = MlflowClient(flow_run.recipe.tracking.uri)
    exp = client.get_experiment_by_name(flow_run.recipe.name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fastgen.level") == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["fastgen.invocation"].startswith("prefect-")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["fastgen.stage"] for r in children) == sorted(STAGES)
    assert len(runs) == 1 + len(STAGES)


def test_second_flow_run_skips_up_to_date_stages(flow_run, capfd):
    from mlflow import MlflowClient

    client = MlflowClient(flow_run.recipe.tracking.uri)
    exp = client.get_experiment_by_name(flow_run.recipe.name)
    n_runs = len(client.search_runs([exp.experiment_id]))
    before = _snapshot(flow_run.recipe)
    capfd.readouterr()

    result, _ = _run_flow(flow_run.path)

    err = capfd.readouterr().err
    assert _snapshot(flow_run.recipe) == before  # manifests untouched (bytes and mtimes)
    assert {s: r["digest"] for s, r in result.items()} == {s: r["digest"] for s, r in flow_run.result.items()}
    timing = [json.loads(line.split(TIMING_PREFIX, 1)[1]) for line in err.splitlines() if TIMING_PREFIX in line]
    assert sorted(t["stage"] for t in timing) == sorted(STAGES)
    assert all(t["skipped"] for t in timing)
    assert err.count("up to date") == len(STAGES)
    # digest checks only: no stage ran its own work or opened a run (speed is measured in bench/)
    assert all("run" not in t["phases"] and "mlflow_setup" not in t["phases"] for t in timing), timing
    assert len(client.search_runs([exp.experiment_id])) == n_runs  # nothing tracked for skipped stages
