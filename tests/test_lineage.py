"""Lineage and verification from manifests: the CD student's tree names its teacher, the data
digest, the code version and the settings; one changed byte in a checkpoint makes `verify` fail
naming it and makes the next consuming stage refuse, writing nothing."""
from __future__ import annotations

import json

import pytest

from fastgen_core import artifacts
from stages.recipe import load_recipe
from stages import lineage
from stages.runtime import StageError, run_stage, stage_dir


@pytest.fixture
def ran(tiny_recipe, clean_invocation):
    path = tiny_recipe(only=["teacher", "cd"], stages={"cd": {"train": {"steps": 20}}, "teacher": {"train": {"steps": 30}}})
    recipe = load_recipe(path)
    for s in recipe.order():
        run_stage(recipe, s)
    return recipe


def test_lineage_tree_from_manifests(ran, capsys):
    cd = stage_dir(ran, "cd")
    tree = lineage.manifest_tree(cd)
    assert tree["stage"] == "cd" and tree["method"]["name"] == "cd"
    (teacher,) = tree["inputs"]
    assert teacher["stage"] == "teacher" and teacher["role"] == "teacher"
    assert teacher["digest"] == artifacts.read_manifest(stage_dir(ran, "teacher"))["digest"]
    assert tree["data_digest"] and tree["data_digest"] == teacher["data_digest"]
    assert tree["code"]["git_commit"] and len(tree["code"]["git_commit"]) == 40
    assert tree["train"]["steps"] == 20 and teacher["train"]["steps"] == 30
    assert lineage.main_lineage([str(cd)]) == 0
    out = capsys.readouterr().out
    assert "tiny_cd/cd (distill" in out and "[teacher] tiny_cd/teacher" in out
    assert lineage.main_lineage([str(cd), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["stage"] == "teacher"


def test_tampered_checkpoint_is_caught_and_refused(ran, capsys):
    teacher, cd = stage_dir(ran, "teacher"), stage_dir(ran, "cd")
    assert lineage.main_verify([str(ran.path)]) == 0
    f = teacher / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert lineage.main_verify([str(teacher)]) == 1
    assert "model.safetensors" in capsys.readouterr().out
    before = artifacts.read_manifest(cd)
    with pytest.raises(StageError, match="refuses input 'teacher'.*model.safetensors"):
        run_stage(ran, "cd", force=True)
    assert artifacts.read_manifest(cd) == before  # nothing written
    assert not [p for p in cd.parent.iterdir() if p.name.startswith(".cd.tmp")]


def _edges(node: dict, out: set | None = None) -> set[tuple[str, str, str]]:
    """Every (consumer, input stage, role) of a lineage tree."""
    out = set() if out is None else out
    for i in node["inputs"]:
        out.add((node["stage"], i["stage"], i["role"]))
        _edges(i, out)
    return out


def _nodes(node: dict) -> list[dict]:
    return [node] + [n for i in node["inputs"] for n in _nodes(i)]


@pytest.mark.xdist_group("recipe-digits_crosspaper")  # the flow run tests/test_recipes.py makes (and caches)
def test_crosspaper_lineage_shows_guide_teacher_dmd2_and_every_msd_student(prefect_harness, tmp_path_factory,
                                                                           mlflow_template):
    """The cross-paper recipe (params/digits_crosspaper.yaml: autoguided teacher -> DMD2 -> MSD), shrunk
    through the Prefect flow: the tree of its evaluation, from the manifests, holds the weak guide (a
    snapshot of the teacher), the teacher, the autoguided DMD2 student and the K = 4 students of the
    MSD router, each student made from the teacher AND the guide with the autoguided real score;
    every copy of the teacher in the tree is the one teacher artifact; and the router's tree read
    from MLflow alone has the same edges and digests."""
    from test_recipes import ROOT, flow_run

    root, p, results = flow_run(ROOT / "params" / "digits_crosspaper.yaml", tmp_path_factory, mlflow_template)
    r = load_recipe(p)
    tree = lineage.manifest_tree(stage_dir(r, "eval"))
    edges = _edges(tree)
    K = 4
    students = {f"msd_{k}" for k in range(K)}
    assert {("eval", s, "models") for s in ("teacher", "guide", "dmd2", "msd")} <= edges
    assert ("guide", "teacher", "teacher") in edges
    assert {("msd", s, "students") for s in students} <= edges
    assert {(s, up, up) for s in students | {"dmd2"} for up in ("teacher", "guide")} <= edges
    assert ("dmd2_plain", "guide", "guide") not in edges  # the unguided piece alone has no guide
    nodes = _nodes(tree)
    by_stage = {}
    for n in nodes:
        by_stage.setdefault(n["stage"], []).append(n)
    assert students | {"msd", "msds", "msds_0", "msds_1", "msds_tsm_0", "msds_tsm_1", "dmd2", "dmd2_plain",
                       "guide", "teacher", "features"} <= set(by_stage)
    # one teacher, one guide: every occurrence carries the digest of the stage's own output
    for stage in ("teacher", "guide", "dmd2", *students):
        assert {n["digest"] for n in by_stage[stage]} == {results[stage]["digest"]}, stage
    assert by_stage["guide"][0]["kind"] == "weak_snapshot" and by_stage["guide"][0]["method"]["mode"] == "snapshot"
    for s in students | {"dmd2"}:
        m = by_stage[s][0]["method"]
        assert (m["name"], m["guidance"], m["real_guidance"]) == ("dmd2", "auto", 2.0), s
    assert by_stage["msd"][0]["method"]["classes"] == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    # the router trains nothing, so its node has no train settings; its students and the teacher do
    assert by_stage["msd"][0]["train"] is None and by_stage["msds"][0]["train"] is None
    assert all(by_stage[s][0]["train"]["steps"] > 0 for s in (*students, "teacher", "msds_tsm_0"))
    # the same tree of the router from MLflow alone (tags and logged manifests; no files read)
    ml = lineage.MlflowLineage(f"sqlite:///{root / 'mlflow.db'}")
    router = next(n for n in nodes if n["stage"] == "msd")
    from_mlflow = ml.tree(router["mlflow_run_id"])
    assert _edges(from_mlflow) == _edges(router)
    assert {(n["stage"], n["digest"]) for n in _nodes(from_mlflow)} == {(n["stage"], n["digest"]) for n in _nodes(router)}


def test_code_version_outside_a_git_tree_comes_from_the_image_build(tmp_path, monkeypatch):
    """In a git work tree the commit is git's; outside one (the project image has no .git) it is the
    build's FASTGEN_GIT_COMMIT / FASTGEN_GIT_DIRTY, and unknown (None) where neither says."""
    import subprocess

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path counts
    bare = tmp_path / "image"
    bare.mkdir()
    monkeypatch.delenv("FASTGEN_GIT_COMMIT", raising=False)
    assert artifacts.git_commit(bare) == {"git_commit": None, "dirty": None}
    monkeypatch.setenv("FASTGEN_GIT_COMMIT", "a" * 40)
    monkeypatch.setenv("FASTGEN_GIT_DIRTY", "1")
    assert artifacts.git_commit(bare) == {"git_commit": "a" * 40, "dirty": True}
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    (repo / "f").write_text("x")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert artifacts.git_commit(repo) == {"git_commit": head, "dirty": False}
