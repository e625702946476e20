"""MLflow tracking of a pipeline invocation, read back with `mlflow.MlflowClient`: one parent run
per invocation, one child run per stage (tag mlflow.parentRunId) with its params, metrics (loss
curves), artifacts (evaluate: plots and metrics.json) and tags (git commit, params digest,
output digest, upstream runs). The invocation is the `stagewise_run` fixture: `run_stage` for each
stage under one FASTGEN_INVOCATION, as `dvc repro` runs them."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from fastgen_core import artifacts
from stages.runtime import PROJECT, run_stage, stage_dir

STAGES = {"teacher": "teacher", "pairs": "ode_pairs", "cd": "distill", "eval": "evaluate"}


@pytest.fixture(scope="module")
def tracked(stagewise_run):
    from mlflow import MlflowClient

    client = MlflowClient(stagewise_run.uri)
    exp = client.get_experiment_by_name(stagewise_run.recipe.name)
    assert exp is not None
    return stagewise_run, client, exp.experiment_id


def _parents(client, exp, invocation):
    return client.search_runs(
        [exp], f"tags.`fastgen.invocation` = '{invocation}' and tags.`fastgen.level` = 'pipeline'")


def _children(client, exp, parent_id):
    return {r.data.tags["fastgen.stage"]: r
            for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")}


def test_one_parent_and_one_child_per_stage(tracked):
    sw, client, exp = tracked
    parents = _parents(client, exp, sw.invocation)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["fastgen.recipe_digest"] == sw.recipe.digest()
    children = _children(client, exp, parent.info.run_id)
    assert sorted(children) == sorted(STAGES)
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.info.run_name == stage
        assert run.data.tags["fastgen.level"] == "stage"
        assert run.data.tags["fastgen.invocation"] == sw.invocation
        # the manifest points back at exactly this run
        assert sw.manifests[stage]["mlflow"] == {"run_id": run.info.run_id, "parent_run_id": parent.info.run_id}


def test_child_tags_identify_code_params_output_and_upstream(tracked):
    sw, client, exp = tracked
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True).stdout.strip()
    assert len(head) == 40
    children = _children(client, exp, _parents(client, exp, sw.invocation)[0].info.run_id)
    for stage, run in children.items():
        t, m = run.data.tags, sw.manifests[stage]
        assert t["fastgen.git_commit"] == head == m["code"]["git_commit"]
        assert t["fastgen.params_digest"] == sw.recipe.digest(stage) == m["params_digest"]
        assert t["fastgen.output_digest"] == m["digest"]
        assert t["fastgen.kind"] == STAGES[stage]
        assert t["fastgen.dvc_stage"] == f"tiny_cd-{stage}"
        assert Path(t["fastgen.output"]) == stage_dir(sw.recipe, stage)
        for up in sw.recipe.upstream(stage):  # lineage: digest and run of each input
            assert t[f"fastgen.input.{up}"] == sw.manifests[up]["digest"]
            assert t[f"fastgen.upstream_run.{up}"] == children[up].info.run_id
    assert not any(k.startswith("fastgen.input.") for k in children["teacher"].data.tags)


def test_child_params_are_the_stage_settings(tracked):
    sw, client, exp = tracked
    children = _children(client, exp, _parents(client, exp, sw.invocation)[0].info.run_id)
    for stage, run in children.items():
        p = run.data.params
        assert p["seed"] == "0" and p["data.name"] == "8gaussians" and p["data.n_train"] == "2000"
        assert p["noise.sigma_max"] == "80.0"
        assert p["stage.kind"] == STAGES[stage]
    assert children["teacher"].data.params["stage.train.steps"] == "400"
    assert children["teacher"].data.params["stage.method.name"] == "edm"
    assert children["cd"].data.params["stage.train.steps"] == "100"
    assert children["cd"].data.params["stage.method.N"] == "10"
    assert children["pairs"].data.params["stage.pairs.n_pairs"] == "500"
    assert children["eval"].data.params["stage.evaluate.teacher_nfe"] == "[1, 35]"


def test_training_children_log_loss_curves(tracked):
    sw, client, exp = tracked
    children = _children(client, exp, _parents(client, exp, sw.invocation)[0].info.run_id)
    for stage, steps, every in [("teacher", 400, 20), ("cd", 100, 10)]:
        hist = sorted(client.get_metric_history(children[stage].info.run_id, "net/loss"), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(every, steps + 1, every)), stage
        assert all(math.isfinite(m.value) and m.value > 0 for m in hist)
        ws = client.get_metric_history(children[stage].info.run_id, "dist/world_size")
        assert [(m.step, m.value) for m in ws] == [(steps, 1.0)]  # local backend: one process
    teacher = [m.value for m in sorted(client.get_metric_history(children["teacher"].info.run_id, "net/loss"),
                                       key=lambda m: m.step)]
    assert sum(teacher[-3:]) / 3 < 0.85 * sum(teacher[:3]) / 3  # the denoising loss went down
    assert children["pairs"].data.metrics == {"n_pairs": 500.0, "teacher_nfe": 35.0}


def test_evaluate_child_has_plots_metrics_json_and_metrics(tracked, tmp_path):
    sw, client, exp = tracked
    children = _children(client, exp, _parents(client, exp, sw.invocation)[0].info.run_id)
    ev = children["eval"]
    top = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert top == {"metrics.json", "plots", "fastgen"}  # fastgen/manifest.json: lineage without the files
    plots = {a.path for a in client.list_artifacts(ev.info.run_id, "plots")}
    assert plots == {"plots/quality_vs_nfe.png", "plots/samples.png"}
    got = Path(client.download_artifacts(ev.info.run_id, "metrics.json", str(tmp_path)))
    out = stage_dir(sw.recipe, "eval")
    assert got.read_bytes() == (out / "metrics.json").read_bytes()
    png = Path(client.download_artifacts(ev.info.run_id, "plots/samples.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.read_bytes() == (out / "plots" / "samples.png").read_bytes()
    # artifacts are stored next to the SQLite store, not in the working directory's ./mlruns
    art_root = Path(urlparse(ev.info.artifact_uri).path)
    assert sw.root in art_root.parents
    # every scalar of metrics.json is a run metric ('@' is not allowed in MLflow names)
    metrics = json.loads((out / "metrics.json").read_text())
    m = ev.data.metrics
    assert m["cd.nfe_1.swd"] == metrics["cd"]["nfe_1"]["swd"]["mean"]
    assert m["teacher.nfe_35.mode_coverage"] == metrics["teacher"]["nfe_35"]["mode_coverage"]["mean"]
    assert m["cd.coupling.mse"] == metrics["cd"]["coupling"]["mse"]
    assert len(m) == sum(len(d) for r in metrics.values() for d in r.values())


def test_second_invocation_makes_a_second_parent(tracked, monkeypatch):
    sw, client, exp = tracked
    first = _parents(client, exp, sw.invocation)[0].info.run_id
    n_parents = len(client.search_runs([exp], "tags.`fastgen.level` = 'pipeline'"))
    monkeypatch.setenv("FASTGEN_INVOCATION", "test-second-invocation")
    # everything is up to date: an invocation that runs nothing tracks nothing
    run_stage(sw.recipe, "pairs")
    assert _parents(client, exp, "test-second-invocation") == []
    # forced, the stage runs again (deterministically: same output) under a new parent
    m = run_stage(sw.recipe, "pairs", force=True)
    assert m["digest"] == sw.manifests["pairs"]["digest"]
    assert len(client.search_runs([exp], "tags.`fastgen.level` = 'pipeline'")) == n_parents + 1
    second = _parents(client, exp, "test-second-invocation")
    assert len(second) == 1 and second[0].info.run_id != first
    assert sorted(_children(client, exp, second[0].info.run_id)) == ["pairs"]
    assert sorted(_children(client, exp, first)) == sorted(STAGES)  # the first is unchanged
    assert m["mlflow"]["parent_run_id"] == second[0].info.run_id
    assert artifacts.verify(stage_dir(sw.recipe, "pairs"))["digest"] == sw.manifests["pairs"]["digest"]


def test_stages_outside_any_invocation_share_a_solo_parent(tracked, monkeypatch):
    sw, client, exp = tracked
    monkeypatch.delenv("FASTGEN_INVOCATION", raising=False)
    a = run_stage(sw.recipe, "pairs", force=True)
    b = run_stage(sw.recipe, "pairs", force=True)
    assert a["mlflow"]["parent_run_id"] == b["mlflow"]["parent_run_id"]
    assert a["mlflow"]["run_id"] != b["mlflow"]["run_id"]
    parent = client.get_run(a["mlflow"]["parent_run_id"])
    assert parent.data.tags["fastgen.invocation"].startswith("solo-")
    # ... without leaving it in the environment, where a flow started next in this process would
    # adopt it instead of making its own invocation
    assert "FASTGEN_INVOCATION" not in os.environ


def test_runs_left_running_by_gone_processes_end_killed_and_live_ones_stay(tmp_path, mlflow_template):
    """`end_stale_runs` marks KILLED the RUNNING runs of one stage (recipe, stage, params digest)
    whose process is gone: one that exited, and a pid now held by a process that started at another
    time. It leaves alone a live process's run (this one's), a run from another host (which cannot
    be judged), and runs of other settings. A parent run ends KILLED with its killed stage unless a
    stage under it still runs in a live process."""
    import shutil
    import socket
    import sys

    from mlflow import MlflowClient

    from stages import tracking

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("stale")
    exited = subprocess.run([sys.executable, "-c", "from stages.tracking import process_id; print(process_id())"],
                            cwd=PROJECT, capture_output=True, text=True, check=True).stdout.strip()
    host, pid = socket.gethostname(), os.getpid()
    reused = f"{host}:{pid}:1"  # this pid, another start time

    def run(parent, proc, digest="d1"):
        tags = {"fastgen.recipe": "r", "fastgen.stage": "s", "fastgen.params_digest": digest, "fastgen.process": proc}
        return client.create_run(exp, tags={**tags, **({"mlflow.parentRunId": parent} if parent else {})}).info.run_id

    p_dead, p_mixed = run(None, exited, "parent"), run(None, exited, "parent")
    dead, reused_run = run(p_dead, exited), run(p_dead, reused)
    dead_mixed, live = run(p_mixed, exited), run(p_mixed, tracking.process_id())
    elsewhere, other_digest = run(None, "elsewhere:123:456"), run(None, exited, "d2")

    killed = tracking.end_stale_runs(client, exp, "r", "s", "d1", keep_parent="none")
    assert sorted(killed) == sorted([dead, reused_run, dead_mixed])
    status = {r: client.get_run(r).info.status for r in (p_dead, p_mixed, dead, reused_run, dead_mixed, live,
                                                        elsewhere, other_digest)}
    assert status == {p_dead: "KILLED", p_mixed: "RUNNING", dead: "KILLED", reused_run: "KILLED",
                      dead_mixed: "KILLED", live: "RUNNING", elsewhere: "RUNNING", other_digest: "RUNNING"}
    assert exited in client.get_run(dead).data.tags["fastgen.failure"]
    assert tracking.end_stale_runs(client, exp, "r", "s", "d1", keep_parent="none") == []
