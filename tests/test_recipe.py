"""Bad recipes: one line per problem naming the file and the field path, exit status 2, nothing
written (no stage output, no MLflow database)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.recipe import RecipeError, load_recipe
from stages.runtime import main

ROOT = Path(__file__).resolve().parent.parent
GOOD = yaml.safe_load((ROOT / "params/toy_cd.yaml").read_text())


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["storage"] = {"root": str(tmp_path / "out")}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _set(path: str, value):
    def mutate(raw):
        *head, last = path.split(".")
        d = raw
        for k in head:
            d = d[k]
        d[last] = value
    return mutate


CASES = {
    "unknown field": (_set("stages.teacher.train.stepz", 10), "stages.teacher.train.stepz", "Extra inputs"),
    "wrong type": (_set("stages.cd.train.steps", "many"), "stages.cd.train.steps", "integer"),
    "wrong method type": (_set("stages.cd.method.N", "eighteen"), "stages.cd.method.N", "integer"),
    "missing input stage": (_set("stages.cd.inputs", {"teacher": "teachr"}), "stages.cd.inputs.teacher", "teachr"),
    "cycle": (_set("stages.teacher.inputs", {"student": "cd"}), "stages.", "cycle"),
    "unknown method": (_set("stages.cd.method", {"name": "magic"}), "stages.cd.method.name", "unknown method"),
    "missing data path": (_set("data", {"kind": "images", "name": "folder", "root": "/nonexistent/imgs"}),
                          "data.root", "/nonexistent/imgs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    mutate, field, words = CASES[case]
    p = write(tmp_path, mutate)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert len(e.value.problems) >= 1
    line = next(l for l in e.value.problems if field in l)
    assert line.startswith(f"{p}: ") and words in line and "\n" not in line
    # the CLI: status 2, the same lines on stderr, nothing written
    assert main([str(p), "teacher"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(field in l and l.startswith(str(p)) for l in err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_every_problem_reported(tmp_path):
    def mutate(raw):
        raw["stages"]["cd"]["train"]["steps"] = -1
        raw["stages"]["teacher"]["train"]["lr"] = "fast"
        raw["compute"] = {"backend": "slurm"}
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, mutate))
    fields = " ".join(e.value.problems)
    assert "stages.cd.train.steps" in fields and "stages.teacher.train.lr" in fields and "compute.backend" in fields


def test_cli_subprocess_exit_status(tmp_path):
    p = write(tmp_path, _set("stages.cd.method", {"name": "magic"}))
    r = subprocess.run([sys.executable, "-m", "stages.run", str(p), "cd"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [f"{p}: stages.cd.method.name: unknown method 'magic' (known: "
                     + lines[0].split("(known: ")[1]]
    assert not (tmp_path / "out").exists()


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "b.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(tmp_path / "b.yaml")


def test_shipped_recipes_validate_and_order():
    for f in sorted((ROOT / "params").glob("*.yaml")):
        r = load_recipe(f)
        order = r.order()
        for s in order:
            assert all(order.index(u) < order.index(s) for u in r.upstream(s))


def test_stage_digest_depends_only_on_its_settings():
    r = load_recipe(ROOT / "params/toy_cd.yaml")
    raw = r.model_dump(mode="json")
    raw["stages"]["cd"]["train"]["lr"] = 1e-5
    from stages.recipe import parse_recipe
    r2 = parse_recipe(raw)
    assert r.digest("teacher") == r2.digest("teacher")
    assert r.digest("cd") != r2.digest("cd")


# --- stage groups: one declaration that stands for several stages ----------------------------------

def _two_round_pairs(self, name, recipe):
    """A stand-in group kind: an ode_pairs declaration that expands into two pair stages (members
    are marked by batch_size 4095, so they are not groups themselves)."""
    if self.pairs.batch_size == 4095:
        return None
    member = self.model_copy(update={"pairs": self.pairs.model_copy(update={"batch_size": 4095})})
    return {f"{name}_first": member, name: member.model_copy()}


def test_group_expands_in_place_and_dvc_reads_the_declaration(tmp_path, monkeypatch):
    from stages import dvcgen, ode_pairs

    monkeypatch.setattr(ode_pairs.Spec, "expand", _two_round_pairs)
    r = load_recipe(ROOT / "params" / "toy_ctm.yaml")
    names = list(r.stages)
    assert names.index("pairs_first") == names.index("pairs") - 1  # in declaration order, before the group
    assert r.groups == {"pairs": ["pairs_first", "pairs"]}
    assert r.declared_as("pairs_first") == "pairs" and r.declared_as("ctm") == "ctm"
    assert r.order().index("pairs_first") > r.order().index("teacher")
    # DVC can only read keys that exist in the YAML: a member's params are its group's declaration
    entry = dvcgen.stage_entry(r, "params/toy_ctm.yaml", "pairs_first", {"seed", "data", "noise"})
    assert entry["params"][0]["params/toy_ctm.yaml"][-1] == "stages.pairs"
    assert r.digest("pairs_first") == r.digest("pairs")  # same settings, same inputs: same params digest


def test_group_member_name_clash_is_one_line(tmp_path, monkeypatch):
    from stages import ode_pairs

    monkeypatch.setattr(ode_pairs.Spec, "expand", _two_round_pairs)
    raw = yaml.safe_load((ROOT / "params" / "toy_ctm.yaml").read_text())
    raw["stages"]["pairs_first"] = {"kind": "evaluate", "inputs": {"models": ["teacher"]}}
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.problems == [f"{path}: stages.pairs: expands into a stage named 'pairs_first', which this "
                                "recipe already has: rename one of them"]


def test_order_of_targets_is_them_and_their_upstream():
    # toy_dmd declares dmd <- {teacher, pairs}, pairs <- teacher, dmd2 <- teacher; eval reads them all
    r = load_recipe(ROOT / "params/toy_dmd.yaml")
    assert r.order(["dmd"]) == ["teacher", "pairs", "dmd"]
    assert r.order(["dmd2", "dmd"]) == ["teacher", "dmd2", "pairs", "dmd"]
    assert r.order() == r.order(list(r.stages))
