"""The tiny pipeline with everything remote: outputs on an S3 server (moto, 127.0.0.1), tracking
on a real `mlflow server` whose artifacts go to the same bucket. Outputs are objects with their
manifest; lineage and verify answer from the bucket; an incomplete artifact (no manifest) and a
checkpoint with one changed byte are refused by the stage that consumes them, writing nothing.
A Ray Train stage keeps its run folder (`RunConfig.storage_path`) in the same bucket."""
from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest
import s3fs

from fastgen_core import artifacts
from stages.recipe import load_recipe
from stages import lineage, storage
from stages.runtime import StageError, run_stage

STAGES = ["teacher", "pairs", "cd", "eval"]


@pytest.fixture(scope="module")
def remote(s3_server, mlflow_server, tiny_recipe_session, tmp_path_factory):
    """The tiny recipe (smaller training and evaluation) run stage by stage, as `dvc repro`
    would, with storage root s3://fastgen-test/<run>/outputs and the MLflow server."""
    prefix = f"{s3_server.url}/{uuid.uuid4().hex[:8]}/outputs"
    path = tiny_recipe_session(
        "s3", storage={"root": prefix}, tracking={"uri": mlflow_server.url},
        stages={"teacher": {"train": {"steps": 150}}, "cd": {"train": {"steps": 40}},
                "eval": {"evaluate": {"n_samples": 300, "seeds": [0], "nfe": [1], "teacher_nfe": [3]}}})
    recipe = load_recipe(path)
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTGEN_CACHE_DIR", str(cache))
        mp.setenv("FASTGEN_INVOCATION", f"test-s3-{uuid.uuid4().hex[:8]}")
        manifests = {s: run_stage(recipe, s) for s in recipe.order()}
        yield recipe, manifests, prefix, cache


def _fs():
    return s3fs.S3FileSystem()


def test_outputs_are_objects_with_their_manifest(remote):
    recipe, manifests, prefix, _ = remote
    assert prefix.startswith("s3://")
    assert not (Path(recipe.path).parent / "outputs").exists()  # nothing stored locally
    fs = _fs()
    for s in STAGES:
        uri = f"{prefix}/{recipe.name}/{s}"
        m = json.loads(fs.cat_file(f"{uri}/manifest.json"))
        assert m["digest"] == manifests[s]["digest"] and m["location"] == uri
        keys = {k.split(f"/{s}/", 1)[1] for k in fs.find(uri)}
        assert keys == set(m["files"]) | {"manifest.json"}, s
    assert {"model.safetensors", "model.json"} <= set(manifests["teacher"]["files"])
    # each consumer records where its inputs are stored and which content it used
    cd_in = manifests["cd"]["inputs"]["teacher"]
    assert cd_in == {"role": "teacher", "digest": manifests["teacher"]["digest"],
                     "path": f"{prefix}/{recipe.name}/teacher"}


def test_verify_and_lineage_answer_from_the_bucket(remote, capsys):
    recipe, manifests, prefix, _ = remote
    assert lineage.main_verify([recipe.path]) == 0
    assert "4 artifact(s) checked, 0 problem(s)" in capsys.readouterr().out
    ev = f"{prefix}/{recipe.name}/eval"
    tree = lineage.manifest_tree(ev)
    assert tree["path"] == ev and tree["digest"] == manifests["eval"]["digest"]
    assert {c["stage"]: c["digest"] for c in tree["inputs"]} == \
        {s: manifests[s]["digest"] for s in ("teacher", "cd", "pairs")}
    cd = next(c for c in tree["inputs"] if c["stage"] == "cd")
    assert cd["inputs"][0]["stage"] == "teacher" and cd["inputs"][0]["path"].startswith("s3://")
    assert lineage.main_lineage([ev]) == 0
    assert "[teacher] tiny_cd/teacher" in capsys.readouterr().out


def test_up_to_date_is_read_from_the_bucket(remote, tmp_path, monkeypatch, capsys):
    """With an empty local cache, a second run finds every output up to date from S3."""
    recipe, manifests, _, _ = remote
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "fresh-cache"))
    capsys.readouterr()
    for s in STAGES:
        assert run_stage(recipe, s)["digest"] == manifests[s]["digest"]
    err = capsys.readouterr().err
    assert all(f"{recipe.name}/{s}: up to date" in err for s in STAGES), err


def test_mlflow_server_keeps_artifacts_in_the_bucket(remote, mlflow_server, s3_server):
    from mlflow import MlflowClient

    recipe, manifests, prefix, _ = remote
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(manifests["eval"]["mlflow"]["run_id"])
    assert run.data.tags["fastgen.output"] == f"{prefix}/{recipe.name}/eval"
    assert run.data.tags["fastgen.output_digest"] == manifests["eval"]["digest"]
    assert "cd.nfe_1.swd" in run.data.metrics
    exp, rid = run.info.experiment_id, run.info.run_id
    stored = f"{mlflow_server.artifacts}/{exp}/{rid}/artifacts"
    fs = _fs()
    got = fs.cat_file(f"{stored}/metrics.json")
    ev = storage.fetch(f"{prefix}/{recipe.name}/eval")[0]
    assert got == (ev / "metrics.json").read_bytes()
    assert fs.find(f"{stored}/plots") and all(p.endswith(".png") for p in fs.find(f"{stored}/plots"))
    # credentials appear nowhere: not in params, tags or manifests
    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    for s in STAGES:
        r = client.get_run(manifests[s]["mlflow"]["run_id"])
        assert secret not in json.dumps([r.data.params, r.data.tags])
        assert secret not in fs.cat_file(f"{prefix}/{recipe.name}/{s}/manifest.json").decode()


def test_artifact_without_manifest_is_incomplete_and_refused(remote):
    """An upload cut short leaves objects without manifest.json: the consumer refuses them."""
    recipe, _, prefix, _ = remote
    fs = _fs()
    man = f"{prefix}/{recipe.name}/pairs/manifest.json"
    saved = fs.cat_file(man)
    fs.rm_file(man)
    try:
        with pytest.raises(StageError, match=r"refuses input 'pairs'.*no manifest.json \(incomplete"):
            run_stage(recipe, "eval", force=True)
        assert lineage.verify_artifact(f"{prefix}/{recipe.name}/pairs")
    finally:
        fs.pipe_file(man, saved)


def test_tampered_checkpoint_in_the_bucket_is_caught_and_refused(remote, capsys):
    recipe, manifests, prefix, cache = remote
    fs = _fs()
    teacher, cd = f"{prefix}/{recipe.name}/teacher", f"{prefix}/{recipe.name}/cd"
    key = f"{teacher}/model.safetensors"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(key, bytes(data))

    assert lineage.main_verify([teacher]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and f"{teacher}: content does not match its manifest: model.safetensors" in out
    assert lineage.main_verify([recipe.path]) == 1

    # the local cache still holds the untouched copy: the changed object is noticed all the same
    assert (cache / "artifacts" / manifests["teacher"]["digest"] / "model.safetensors").exists()
    before = fs.cat_file(f"{cd}/manifest.json")
    with pytest.raises(StageError, match=r"stage 'cd' refuses input 'teacher' from stage 'teacher': "
                                         r"s3://.*/teacher: content does not match its manifest: model.safetensors"):
        run_stage(recipe, "cd", force=True)
    assert fs.cat_file(f"{cd}/manifest.json") == before  # nothing written
    assert artifacts.MANIFEST in {k.rsplit("/", 1)[1] for k in fs.find(cd)}
    assert not [p for p in (cache / "artifacts").iterdir() if p.name.startswith((".out-", ".fetch-"))]


@pytest.mark.xdist_group("ray")  # one local Ray runtime at a time under pytest-xdist
def test_ray_train_storage_path_on_s3(s3_server, mlflow_server, tiny_recipe_session, tmp_path, monkeypatch):
    """backend: ray with an s3:// root: Ray Train's run folder and checkpoint go through the S3
    server (its request log shows them), the stage output is published there, and Ray's run
    folder is removed once the checkpoint is copied out."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTGEN_INVOCATION", f"test-s3-ray-{uuid.uuid4().hex[:8]}")
    prefix = f"{s3_server.url}/{uuid.uuid4().hex[:8]}/outputs"
    path = tiny_recipe_session("s3ray", only=["teacher"], storage={"root": prefix}, tracking={"uri": mlflow_server.url},
                               compute={"backend": "ray", "num_workers": 1},
                               stages={"teacher": {"train": {"steps": 30, "log_every": 10}}})
    recipe = load_recipe(path)
    if ray.is_initialized():
        ray.shutdown()
    try:
        m = run_stage(recipe, "teacher")
    finally:
        ray.shutdown()
    uri = f"{prefix}/{recipe.name}/teacher"
    assert storage.verify(uri)["digest"] == m["digest"]
    ray_run = f"/{s3_server.bucket}/{prefix.split('/')[3]}/outputs/{recipe.name}/.ray/teacher-"
    puts = [ln for ln in s3_server.log.read_text().splitlines() if "PUT " + ray_run in ln]
    assert any("model.safetensors" in ln for ln in puts), "Ray Train wrote no checkpoint to S3"
    assert not _fs().exists(f"{prefix}/{recipe.name}/.ray/{puts[0].split('/.ray/')[1].split('/')[0]}")


def test_four_pipelines_at_once_share_the_server_and_bucket(s3_server, mlflow_server, tiny_recipe,
                                                            tmp_path, monkeypatch):
    """Four small pipelines (teacher -> cd) at once, one thread each, against the same MLflow
    server, bucket and local cache: afterwards every run, loss curve and output is there and every
    digest verifies. (bench/parallel.py does the same with whole pipelines in processes.)"""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTGEN_INVOCATION", f"test-s3-four-{uuid.uuid4().hex[:8]}")
    root = f"{s3_server.url}/{uuid.uuid4().hex[:8]}/outputs"
    small = {"teacher": {"train": {"steps": 40, "log_every": 10}}, "cd": {"train": {"steps": 20, "log_every": 10}}}
    recipes = [load_recipe(tiny_recipe(tmp_path / f"p{i}", ["teacher", "cd"], name=f"four_{i}", seed=i,
                                       storage={"root": root}, tracking={"uri": mlflow_server.url}, stages=small))
               for i in range(4)]

    def pipeline(r):
        return {s: run_stage(r, s) for s in r.order()}

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(pipeline, recipes))
    client = MlflowClient(mlflow_server.url)
    digests = set()
    for r, manifests in zip(recipes, results):
        exp = client.get_experiment_by_name(r.name).experiment_id
        (parent,) = client.search_runs([exp], "tags.`fastgen.level` = 'pipeline'")
        kids = {k.data.tags["fastgen.stage"]: k
                for k in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
        assert sorted(kids) == ["cd", "teacher"] and parent.info.status == "FINISHED"
        for s, m in manifests.items():
            assert kids[s].info.status == "FINISHED" and m["mlflow"]["run_id"] == kids[s].info.run_id
            steps = r.stages[s].train.steps
            hist = client.get_metric_history(kids[s].info.run_id, "net/loss")
            assert sorted(h.step for h in hist) == list(range(10, steps + 1, 10)), (r.name, s)
            assert storage.verify(storage.location(r, s))["digest"] == m["digest"]
            digests.add(m["digest"])
        assert lineage.verify_target(r.path) == ([], 2)
    assert len(digests) == 8  # four seeds: eight different outputs, none overwritten by another


def test_upload_cut_short_leaves_no_manifest(s3_server, tmp_path, monkeypatch):
    """Publishing over an artifact deletes its manifest first and uploads the new one last: an
    upload that stops before the end (here: the manifest is missing locally, so its upload fails)
    leaves objects without a manifest, which fetch and verify reject as incomplete."""
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"{s3_server.url}/{uuid.uuid4().hex[:8]}/r/a"
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.bin").write_bytes(b"old")
    (a / "sub/y.txt").write_text("y")
    m = artifacts.write_manifest(a, {"stage": "a"})
    storage.publish(a, uri)
    assert storage.fetch(uri)[1]["digest"] == m["digest"] == storage.verify(uri)["digest"]

    b = tmp_path / "b"
    b.mkdir()
    (b / "x.bin").write_bytes(b"new")
    with pytest.raises(FileNotFoundError):
        storage.publish(b, uri)  # dies before the commit marker
    keys = {k.rsplit("/a/", 1)[1] for k in _fs().find(uri)}
    assert keys == {"x.bin"}  # the new file is there, the stale one removed, no manifest
    for check in (storage.fetch, storage.verify):
        with pytest.raises(artifacts.DigestMismatch, match=r"no manifest.json \(incomplete"):
            check(uri)


def _cd_lineage_facts(tree: dict, recipe, manifests: dict) -> None:
    """The CD student's provenance: its teacher, the pair set made from the same teacher, the
    dataset digest, the code version and the recipe settings of both ancestors."""
    assert tree["stage"] == "cd" and tree["digest"] == manifests["cd"]["digest"]
    assert tree["method"]["name"] == "cd" and tree["train"]["steps"] == recipe.stages["cd"].train.steps
    (t,) = tree["inputs"]
    assert t["stage"] == "teacher" and t["digest"] == manifests["teacher"]["digest"]
    assert t["train"]["steps"] == recipe.stages["teacher"].train.steps and t["method"]["name"] == "edm"
    assert tree["data_digest"] == t["data_digest"] == manifests["cd"]["data"]["digest"]
    assert len(tree["code"]["git_commit"]) == 40 and tree["code"] == manifests["cd"]["code"]
    rel = {r["stage"]: r for r in tree["related"]}
    assert rel["pairs"]["relation"] == "sibling" and rel["pairs"]["digest"] == manifests["pairs"]["digest"]


def test_lineage_of_the_remote_student_from_the_bucket_and_from_the_server_each_alone(remote, mlflow_server, capsys):
    """`fastgen lineage` on the CD student's checkpoint in the bucket: from the manifests alone
    (the tracking server unreachable) and from the MLflow server alone (the run id, no files read)."""
    recipe, manifests, prefix, _ = remote
    ckpt = f"{prefix}/{recipe.name}/cd/model.safetensors"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    from_bucket = lineage.lineage(ckpt, "auto", down)
    assert {from_bucket["source"]} | {i["source"] for i in from_bucket["inputs"]} == {"manifest"}
    _cd_lineage_facts(from_bucket, recipe, manifests)
    from_server = lineage.lineage(manifests["cd"]["mlflow"]["run_id"], "mlflow", mlflow_server.url)
    assert {from_server["source"]} | {i["source"] for i in from_server["inputs"]} == {"mlflow"}
    _cd_lineage_facts(from_server, recipe, manifests)
    assert lineage.main_lineage([ckpt, "--source", "mlflow", "--tracking-uri", mlflow_server.url]) == 0
    out = capsys.readouterr().out
    for s in ("tiny_cd/cd (distill", "[teacher] tiny_cd/teacher", manifests["cd"]["data"]["digest"][:16],
              manifests["cd"]["code"]["git_commit"][:12], "tiny_cd/pairs"):
        assert s in out, s
