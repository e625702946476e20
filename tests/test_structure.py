"""The project's shape: stage kinds carry only their own settings and digests, no import cycle,
code dependencies of each DVC stage read from the imports, comments cite only files that exist,
the generated schema reference is current."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import deps, dvcgen
from stages.evaluate import EvalConfig
from stages.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
TOY_CD = yaml.safe_load((ROOT / "params/toy_cd.yaml").read_text())


def _recipe(mutate=None):
    raw = yaml.safe_load(yaml.safe_dump(TOY_CD))
    if mutate:
        mutate(raw)
    return parse_recipe(raw, "toy_cd.yaml")


def _rebuild():
    from stages import evaluate, recipe
    for m in (EvalConfig, evaluate.Spec, recipe.Recipe):
        m.model_rebuild(force=True)


def test_eval_default_does_not_change_a_teachers_digest(monkeypatch):
    before = _recipe()
    field = EvalConfig.model_fields["pass_factor"]
    monkeypatch.setattr(field, "default", field.default + 1)
    _rebuild()
    try:
        after = _recipe()
        assert after.stages["eval"].evaluate.pass_factor == before.stages["eval"].evaluate.pass_factor + 1
        for s in ("teacher", "pairs", "cd"):
            assert after.digest(s) == before.digest(s), s
        assert after.digest("eval") != before.digest("eval")  # the evaluation's own digest does move
    finally:
        monkeypatch.undo()
        _rebuild()
    assert _recipe().stages["eval"].evaluate.pass_factor == field.default


def test_a_stage_takes_only_its_own_kinds_settings():
    with pytest.raises(RecipeError) as e:
        _recipe(lambda r: r["stages"]["teacher"].update(pairs={"n_pairs": 10}))
    assert any("stages.teacher.pairs: Extra inputs are not permitted" in p for p in e.value.problems), e.value.problems
    with pytest.raises(RecipeError) as e:
        _recipe(lambda r: r["stages"]["eval"].update(train={"steps": 3}))
    assert any("stages.eval.train:" in p for p in e.value.problems)
    # the params digest holds the stage's own fields and nothing else
    r = _recipe()
    assert set(r.stage_params("teacher")["stage"]) == {"kind", "inputs", "method", "network", "train", "noise"}
    assert set(r.stage_params("pairs")["stage"]) == {"kind", "inputs", "pairs"}
    assert set(r.stage_params("eval")["stage"]) == {"kind", "inputs", "evaluate"}


@pytest.mark.parametrize("mutate, line", [
    (lambda r: r["stages"]["cd"].update(kind="distil"), "stages.cd.kind: unknown stage kind 'distil' (known: teacher"),
    (lambda r: r["stages"]["cd"].pop("kind"), "stages.cd.kind: missing"),
    (lambda r: r["stages"]["cd"].pop("method"), "stages.cd.method: Field required"),
    (lambda r: r["stages"]["cd"]["method"].update(N="x"), "stages.cd.method.N: Input should be a valid integer"),
    (lambda r: r["stages"]["cd"].update(inputs={}), "stages.cd.inputs.teacher: method 'cd' needs input 'teacher'"),
    (lambda r: r["stages"]["cd"].update(inputs={"teacher": "teacher", "extra": "teacher"}),
     "stages.cd.inputs.extra: method 'cd' takes no input 'extra'"),
    (lambda r: r["stages"]["cd"].update(inputs={"teacher": "pairs"}),
     "stages.cd.inputs.teacher: stage 'pairs' (ode_pairs) makes no model"),
    (lambda r: r["stages"]["pairs"].update(inputs={"teacher": "cd"}),
     "stages.pairs.inputs.teacher: stage 'cd' is not an EDM model"),
    (lambda r: r["stages"]["eval"].update(inputs={"models": ["teacher", "pairs"]}),
     "stages.eval.inputs.models: stage 'pairs' (ode_pairs) makes no model"),
    (lambda r: r.update(noise={"process": "flow"}), "noise.process: method 'edm' trains in the edm process, not 'flow'"),
    (lambda r: r.update(noise={"process": "magic"}), "noise.process: unknown noise process 'magic' (known: edm"),
    (lambda r: r["stages"]["cd"].update(noise={"process": "trigflow"}),
     "stages.cd.noise.process: method 'cd' trains in the edm process, not 'trigflow'"),
])
def test_bad_stage_settings_one_line_each(mutate, line):
    with pytest.raises(RecipeError) as e:
        _recipe(mutate)
    assert any(p.startswith("toy_cd.yaml: " + line) for p in e.value.problems), e.value.problems


def test_noise_process_is_recipe_data():
    r = _recipe()
    assert r.noise.process == "edm" and r.noise.sigma_max == TOY_CD["noise"]["sigma_max"]
    r2 = _recipe(lambda raw: raw["noise"].update(process="edm"))
    assert r2.digest("teacher") == r.digest("teacher")  # `process: edm` is the default, spelled out
    r3 = _recipe(lambda raw: raw["noise"].update(sigma_max=40.0))
    assert all(r3.digest(s) != r.digest(s) for s in r.stages)


def test_no_import_cycle():
    assert deps.cycles() == []
    # the graph is read, not assumed: a module known to import another is seen doing so
    assert "stages.recipe" in deps.imports("stages.runtime")
    assert "fastgen_core.noise" in deps.imports("fastgen_core.models")


def test_no_comment_cites_a_file_outside_the_repository():
    cited = re.compile(r"\b(METHODS\.md|DESIGN\.md|docs/[\w/]+\.md)")
    bad = []
    files = [*ROOT.glob("fastgen_core/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("flows/*.py"),
             *ROOT.glob("bench/*.py"), *ROOT.glob("bench/*.yaml"), *ROOT.glob("tests/*.py"), *ROOT.glob("params/*.yaml"),
             *ROOT.glob("infra/*")]
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for m in cited.findall(line):
                if m in ("METHODS.md", "DESIGN.md") or not (ROOT / m).exists():
                    if f.name != "test_structure.py":
                        bad.append(f"{f.relative_to(ROOT)}:{n}: {m}")
    assert not bad, bad


def test_code_deps_follow_the_imports():
    r = load_recipe(ROOT / "params/toy_scd.yaml")
    scd = dvcgen.code_deps(r, "scd")
    assert "fastgen_core/methods/scm.py" in scd and "stages/train.py" in scd
    assert "stages/evaluate.py" not in scd and "fastgen_core/metrics.py" not in scd  # another kind's code
    teacher = dvcgen.code_deps(r, "teacher")
    assert "fastgen_core/methods/edm.py" in teacher and "fastgen_core/methods/scm.py" not in teacher
    ev = dvcgen.code_deps(r, "eval")
    assert {"fastgen_core/methods/scm.py", "fastgen_core/metrics.py", "stages/evaluate.py"} <= set(ev)


def _importers(helper: str) -> set[str]:
    """Method modules whose source imports `helper` (read here with a regex, independently of
    stages/deps.py), directly or through another module of fastgen_core that does."""
    src = {f.stem: f.read_text() for f in (ROOT / "fastgen_core").rglob("*.py")}
    names = {helper}
    grew = True
    while grew:
        new = {m for m, s in src.items() if m not in names and any(
            re.search(rf"^\s*(from \.+(?:\w+\.)*{n} import|from \.+ import .*\b{n}\b|import fastgen_core\.{n}\b|"
                      rf"from fastgen_core(?:\.\w+)* import .*\b{n}\b|from fastgen_core\.(?:\w+\.)*{n} import)",
                      s, re.M) for n in names)}
        names |= new
        grew = bool(new)
    return {m for m in names if (ROOT / "fastgen_core/methods" / f"{m}.py").exists()}


def test_dvc_yaml_is_generated_and_current():
    r = subprocess.run([sys.executable, "-m", "stages.dvcgen", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # every stage that samples or trains with a method importing tangents.py depends on it, no other
    users = _importers("tangents")
    assert users, "no method imports tangents.py: the check below would be empty"
    for f in sorted((ROOT / "params").glob("*.yaml")):
        rec = load_recipe(f)
        for s in rec.stages:
            methods = {rec.model_method(x) for x in [s, *rec.upstream(s)]} - {None}
            want = bool(methods & users)
            assert ("fastgen_core/tangents.py" in stages[f"{rec.name}-{s}"]["deps"]) == want, (rec.name, s)


def test_docs_recipes_md_is_current():
    r = subprocess.run([sys.executable, "-m", "stages.docgen", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dvcgen_refuses_two_recipes_with_one_name(tmp_path, monkeypatch, capsys):
    params = tmp_path / "params"
    params.mkdir()
    for n in ("a", "b"):
        (params / f"{n}.yaml").write_text(yaml.safe_dump(TOY_CD))
    monkeypatch.setattr(dvcgen, "PROJECT", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert dvcgen.main([]) == 2
    assert capsys.readouterr().err.strip() == "params/b.yaml: name: recipe name 'toy_cd' is also the name of params/a.yaml"
    assert not (tmp_path / "dvc.yaml").exists()
