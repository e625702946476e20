"""Lineage in MLflow, and `fastgen lineage` from either record on its own.

One tiny pipeline (teacher -> pairs, cd -> eval) runs with credentials planted in the environment.
Then: every stage run holds its inputs (dataset and upstream LoggedModels, with digests), its model
as a LoggedModel and its manifest; the student that passes evaluation is in the model registry
with alias best-1step; the provenance tree of the CD student is the same from the manifests alone
(MLflow unreachable) and from MLflow alone (output folders gone), and names the teacher, the pair
set, the data digest, the git commit and the settings; and the planted secrets appear in no file
written and no line printed."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from fastgen_core import artifacts
from stages.recipe import load_recipe
from stages import lineage, tracking
from stages.runtime import run_stage, stage_dir

SECRET = f"fgsecret-{uuid.uuid4().hex}"  # recognisable, and random per test session
PLANTED = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": f"AKIA{SECRET[-12:].upper()}",
           "MLFLOW_TRACKING_PASSWORD": SECRET[::-1], "FASTGEN_TEST_API_TOKEN": f"tok-{SECRET}"}


@contextlib.contextmanager
def _captured(log: Path):
    """Everything printed (Python streams and file descriptors 1 and 2) goes to `log`."""
    with open(log, "w") as f:
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            f.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@pytest.fixture(scope="module")
def ran(tiny_recipe_session):
    path = tiny_recipe_session("lineage", stages={
        "teacher": {"train": {"steps": 100}}, "cd": {"train": {"steps": 20}},
        # pass_factor: the 20-step student is far from the teacher; registration is what is tested
        "eval": {"evaluate": {"n_samples": 300, "seeds": [0, 1], "nfe": [1], "teacher_nfe": [35],
                              "plots": False, "pass_factor": 1.0e6}}})
    recipe = load_recipe(path)
    saved = {k: os.environ.get(k) for k in [*PLANTED, "FASTGEN_INVOCATION"]}
    os.environ.update(PLANTED, FASTGEN_INVOCATION=f"test-lineage-{uuid.uuid4().hex[:8]}")
    log = path.parent / "printed.log"
    try:
        with _captured(log):
            manifests = {s: run_stage(recipe, s) for s in recipe.order()}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    from mlflow import MlflowClient

    return recipe, manifests, MlflowClient(recipe.tracking.uri), log


def _run(client, manifests, stage):
    return client.get_run(manifests[stage]["mlflow"]["run_id"])


def test_stage_runs_log_inputs_outputs_and_manifest(ran, tmp_path):
    recipe, mans, client, _ = ran
    teacher, cd, pairs, ev = (_run(client, mans, s) for s in ("teacher", "cd", "pairs", "eval"))
    (t_model,) = [o.model_id for o in teacher.outputs.model_outputs]
    (cd_model,) = [o.model_id for o in cd.outputs.model_outputs]
    assert [i.model_id for i in cd.inputs.model_inputs] == [t_model]
    assert [i.model_id for i in pairs.inputs.model_inputs] == [t_model]
    assert sorted(i.model_id for i in ev.inputs.model_inputs) == sorted([t_model, cd_model])
    data_digest = mans["teacher"]["data"]["digest"]
    for r in (teacher, cd, pairs, ev):  # the data, with its full digest
        (d,) = [d for d in r.inputs.dataset_inputs if d.dataset.name == "toy:8gaussians"]
        assert {t.key: t.value for t in d.tags}["fastgen.digest"] == data_digest
        assert json.loads(d.dataset.profile)["sha256"] == data_digest
    (p,) = [d for d in ev.inputs.dataset_inputs if d.dataset.name == "tiny_cd/pairs"]  # a non-model input
    assert {t.key: t.value for t in p.tags}["fastgen.digest"] == mans["pairs"]["digest"]
    assert json.loads(p.dataset.source)["uri"] == str(stage_dir(recipe, "pairs"))
    t = cd.data.tags
    assert t["fastgen.storage_uri"] == str(stage_dir(recipe, "cd"))
    assert t["fastgen.input_uri.teacher"] == str(stage_dir(recipe, "teacher"))
    assert t["fastgen.recipe_digest"] == recipe.digest() and t["fastgen.dvc_stage"] == "tiny_cd-cd"
    got = Path(client.download_artifacts(cd.info.run_id, tracking.MANIFEST_ARTIFACT, str(tmp_path)))
    assert json.loads(got.read_text()) == mans["cd"]
    lm = client.get_logged_model(cd_model)
    assert lm.source_run_id == cd.info.run_id and lm.tags["fastgen.output_digest"] == mans["cd"]["digest"]
    assert lm.params["method.N"] == "10" and lm.params["train.steps"] == "20"
    w = Path(_download_model_file(lm, "model.safetensors", tmp_path))
    assert artifacts.sha256_file(w) == mans["cd"]["files"]["model.safetensors"]


def _download_model_file(lm, name, dst):
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=f"{lm.artifact_location}/{name}", dst_path=str(dst))


def test_passing_student_is_registered_with_alias_and_metrics(ran):
    recipe, mans, client, _ = ran
    results = json.loads((stage_dir(recipe, "eval") / "metrics.json").read_text())
    want = tracking.passing_students(results, {"teacher": "edm", "cd": "cd"}, 1.0e6)
    assert sorted(want) == ["cd"]
    mv = client.get_model_version_by_alias("tiny_cd", tracking.BEST_ALIAS)
    cd_run = _run(client, mans, "cd")
    lm = client.get_logged_model(cd_run.outputs.model_outputs[0].model_id)
    assert mv.run_id == cd_run.info.run_id and mv.source == lm.artifact_location
    assert mv.tags["fastgen.logged_model"] == lm.model_id
    assert mv.tags["fastgen.stage"] == "cd" and mv.tags["fastgen.output_digest"] == mans["cd"]["digest"]
    assert mv.tags["fastgen.eval_run"] == mans["eval"]["mlflow"]["run_id"]
    assert float(mv.tags["eval.above_floor_1nfe"]) == pytest.approx(results["cd"]["nfe_1"]["swd"]["above_floor"])
    assert mv.tags["eval.metric"] == "swd"
    assert float(mv.tags["metrics.nfe_1.mode_coverage"]) == results["cd"]["nfe_1"]["mode_coverage"]["mean"]
    assert float(mv.tags["metrics.coupling.mse"]) == results["cd"]["coupling"]["mse"]
    versions = client.search_model_versions("name = 'tiny_cd'")
    assert [v.tags["fastgen.stage"] for v in versions] == ["cd"]  # the teacher is no student


def test_passing_students_rule():
    def fig(gap, floor_std=0.001):
        return {"swd": {"mean": 0.1 + gap, "above_floor": gap, "floor_std": floor_std}}

    results = {"teacher": {"nfe_1": fig(0.9), "nfe_35": fig(0.02)}, "weak": {"nfe_35": fig(0.2)},
               "good": {"nfe_1": fig(0.039), "nfe_2": fig(0.01)}, "bad": {"nfe_1": fig(0.041)}}
    kinds = {"teacher": "edm", "weak": "edm", "good": "cd", "bad": "sct"}
    got = tracking.passing_students(results, kinds, 2.0)
    assert sorted(got) == ["good"] and got["good"]["threshold"] == pytest.approx(0.04)
    # a teacher within noise of the floor: the floor's spread over seeds is the scale
    results["teacher"]["nfe_35"] = fig(-0.001, floor_std=0.03)
    assert sorted(tracking.passing_students(results, kinds, 2.0)) == ["bad", "good"]


def _essentials(node: dict) -> dict:
    """What both records must agree on (not where it was read from)."""
    keep = ("stage", "kind", "recipe", "path", "digest", "params_digest", "code", "data_digest", "method",
            "train", "mlflow_run_id", "role", "recorded_digest")
    return {**{k: node.get(k) for k in keep}, "inputs": [_essentials(i) for i in node["inputs"]]}


def _check_cd_tree(tree: dict, recipe, mans: dict) -> None:
    assert tree["stage"] == "cd" and tree["method"]["name"] == "cd" and tree["train"]["steps"] == 20
    (t,) = tree["inputs"]
    assert t["stage"] == "teacher" and t["digest"] == mans["teacher"]["digest"] and t["train"]["steps"] == 100
    assert tree["data_digest"] == t["data_digest"] == mans["cd"]["data"]["digest"]
    assert len(tree["code"]["git_commit"]) == 40 and tree["code"] == mans["cd"]["code"]
    rel = {r["stage"]: r for r in tree["related"]}
    assert rel["pairs"]["relation"] == "sibling" and rel["pairs"]["via"] == ["teacher"]
    assert rel["pairs"]["digest"] == mans["pairs"]["digest"]
    assert rel["eval"]["relation"] == "consumer"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns


def test_lineage_from_manifests_alone_when_mlflow_is_unreachable(ran, tmp_path, capsys):
    recipe, mans, _, _ = ran
    cd = str(stage_dir(recipe, "cd"))
    down = f"http://127.0.0.1:{_closed_port()}"
    for uri in (down, f"sqlite:///{tmp_path / 'absent.db'}"):
        t0 = time.time()
        tree = lineage.lineage(cd, "auto", uri)
        assert time.time() - t0 < 10
        assert {tree["source"]} | {i["source"] for i in tree["inputs"]} == {"manifest"}
        _check_cd_tree(tree, recipe, mans)
    assert not (tmp_path / "absent.db").exists()  # not created by looking
    ev = lineage.lineage(str(stage_dir(recipe, "eval")), "manifests")
    assert sorted(i["stage"] for i in ev["inputs"]) == ["cd", "pairs", "teacher"]
    assert ev["related"] == []  # its inputs are ancestors, not siblings
    t0 = time.time()
    assert lineage.main_lineage([cd, "--source", "mlflow", "--tracking-uri", down]) == 2
    assert time.time() - t0 < 10 and "unreachable" in capsys.readouterr().err


def test_lineage_from_manifests_at_a_url(ran, s3_server):
    """Manifests are read through fsspec: the same tree from an object store (the session's S3
    server, moto, bucket fastgen-test) as from local folders."""
    import s3fs

    recipe, mans, _, _ = ran
    base = f"{s3_server.url}/lineage-{uuid.uuid4().hex[:8]}/tiny_cd"
    fs = s3fs.S3FileSystem()
    for s in mans:
        m = artifacts.read_manifest(stage_dir(recipe, s))
        m["inputs"] = {k: {**v, "path": f"{base}/{k}"} for k, v in m["inputs"].items()}
        fs.pipe(f"{base}/{s}/manifest.json", json.dumps(m).encode())
    assert sorted(fs.ls(base, detail=False)) == sorted(f"{base[len('s3://'):]}/{s}" for s in mans)
    tree = lineage.lineage(f"{base}/cd", "manifests")
    (t,) = tree["inputs"]
    assert tree["path"] == f"{base}/cd" and t["path"] == f"{base}/teacher" and t["digest"] == mans["teacher"]["digest"]
    assert tree["data_digest"] == mans["cd"]["data"]["digest"] and tree["code"] == mans["cd"]["code"]
    rel = {r["stage"]: r for r in tree["related"]}
    assert sorted(rel) == ["eval", "pairs"] and rel["pairs"]["path"] == f"{base}/pairs"
    assert rel["pairs"]["digest"] == mans["pairs"]["digest"]


def test_lineage_from_mlflow_alone_when_the_files_are_gone(ran, capsys):
    recipe, mans, _, _ = ran
    uri, cd = recipe.tracking.uri, str(stage_dir(recipe, "cd"))
    from_manifests = lineage.lineage(cd, "manifests")
    assert _essentials(lineage.lineage(f"{cd}/model.safetensors", "manifests")) == _essentials(from_manifests)
    outputs = stage_dir(recipe, "cd").parent
    gone = outputs.with_name("gone")
    os.replace(outputs, gone)
    try:
        tree = lineage.lineage(cd, "auto", uri)  # no manifest there: found in MLflow by its storage URI
        assert {tree["source"]} | {i["source"] for i in tree["inputs"]} == {"mlflow"}
        _check_cd_tree(tree, recipe, mans)
        assert _essentials(tree) == _essentials(from_manifests)
        assert lineage.lineage(mans["cd"]["mlflow"]["run_id"], "mlflow", uri)["digest"] == mans["cd"]["digest"]
        assert lineage.lineage(f"{cd}/model.safetensors", "auto", uri)["digest"] == mans["cd"]["digest"]
        assert lineage.main_lineage([cd, "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        for s in ("tiny_cd/cd (distill: N=10", "└── [teacher] tiny_cd/teacher (teacher: label_dropout=0.0, name=edm)",
                  mans["cd"]["data"]["digest"][:16], mans["cd"]["code"]["git_commit"][:12],
                  "train steps=20 batch=128", "[sibling via teacher] tiny_cd/pairs (ode_pairs)", "(from mlflow)"):
            assert s in out
    finally:
        os.replace(gone, outputs)
    # only the teacher's folder gone: the tree mixes both records
    t_dir = stage_dir(recipe, "teacher")
    os.replace(t_dir, t_dir.with_name("teacher-gone"))
    try:
        tree = lineage.lineage(cd, "auto", uri)
        assert tree["source"] == "manifest" and tree["inputs"][0]["source"] == "mlflow"
        assert _essentials(tree) == _essentials(from_manifests)
        assert lineage.lineage(cd, "manifests")["inputs"][0]["missing"]
    finally:
        os.replace(t_dir.with_name("teacher-gone"), t_dir)


def test_lineage_of_a_registered_model(ran, capsys):
    recipe, mans, _, _ = ran
    uri = recipe.tracking.uri
    tree = lineage.lineage(f"models:/tiny_cd@{tracking.BEST_ALIAS}", "auto", uri)
    _check_cd_tree(tree, recipe, mans)
    assert tree["registered"]["version"] == "1" and tree["registered"]["aliases"] == [tracking.BEST_ALIAS]
    assert lineage.render(tree)[0].startswith("registered model tiny_cd version 1 @best-1step: swd above floor at 1 NFE")
    assert lineage.main_lineage(["models:/tiny_cd/1", "--json", "--tracking-uri", uri]) == 0
    assert _essentials(json.loads(capsys.readouterr().out)) == _essentials(tree)
    assert lineage.main_lineage(["models:/tiny_cd@nope", "--tracking-uri", uri]) == 2
    assert "no such registered model version" in capsys.readouterr().err


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


def test_planted_secrets_are_written_nowhere(ran, tmp_path):
    recipe, _, _, log = ran
    needles = [v.encode() for v in PLANTED.values()]
    root = log.parent  # the recipe, outputs/, mlflow.db, mlruns/ (artifacts, logged models), printed.log
    assert (root / "mlflow.db").exists() and (root / "mlruns").is_dir() and log.stat().st_size > 0
    control = tmp_path / "control"
    control.mkdir()
    (control / "x.bin").write_bytes(b"\0" * 100 + needles[1] + b"\0")
    assert _files_containing(control, needles) == [str(control / "x.bin")]  # the search does find
    assert _files_containing(root, needles) == []
