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
