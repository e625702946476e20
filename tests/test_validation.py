"""Malformed recipes of many kinds fail at validation, whichever way they are run: `fastgen
validate`, `python -m stages.run` (`stages.runtime.main`, what `dvc repro` runs per stage), the
Prefect flow's entry point and `stages.dvcgen`. Each exits with status 2, prints one line per
problem starting with `<file>: <field path>:`, and writes nothing: no outputs folder, no MLflow
database, no cache (the environment's MLflow and cache variables point into the test's folder).
No case trains anything."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASES = {name: yaml.safe_load((ROOT / f"params/{name}.yaml").read_text())
         for name in ("toy_cd", "digits_cd", "digits_edit")}


REMOVE = object()


def put(path: str | dict, value=None, base: str = "toy_cd"):
    """A recipe: `base` with the value at dotted `path` replaced (REMOVE: removed; a callable:
    called with the test's folder), or with each {path: value} of a dict."""
    changes = path if isinstance(path, dict) else {path: value}

    def make(tmp: Path) -> dict:
        raw = copy.deepcopy(BASES[base])
        for where, v in changes.items():
            *head, last = where.split(".")
            node = raw
            for k in head:
                node = node.setdefault(k, {})
            if v is REMOVE:
                node.pop(last, None)
            else:
                node[last] = v(tmp) if callable(v) else v
        return raw
    return make


def text(body: str | bytes | None):
    """A recipe file with exactly these contents (None: a folder where the file should be)."""
    return lambda tmp: body


NAN, INF = float("nan"), float("inf")
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefg", "bcdefgh")) + "name: x\nstages: {}\n"

# id: (recipe, expected field path, words the line holds)
CASES = {
    # the file itself
    "not utf-8": (text("name: caf\xe9\n".encode("latin-1")), "<file>", "not UTF-8"),
    "empty file": (text(""), "<root>", "empty"),
    "not a mapping": (text("- name: toy\n- stages: {}\n"), "<root>", "mapping"),
    "a folder": (text(None), "<file>", "a folder, not a recipe file"),
    "control character": (text("name: to\x00y\nstages: {}\n"), "line 1", "control character"),
    "yaml syntax": (text("name: toy\nstages: {teacher: [\n"), "line 3", "invalid YAML"),
    "python tag": (text("name: !!python/object/apply:os.system [ls]\nstages: {}\n"), "line 1", "constructor"),
    "duplicate key": (text("name: toy\nseed: 1\nseed: 2\nstages: {a: {kind: teacher, method: {name: edm}}}\n"),
                      "seed", "duplicate key (line 3; first at line 2)"),
    "duplicate nested key": (text(yaml.safe_dump(BASES["toy_cd"], sort_keys=False).replace(
        "    train:\n", "    train:\n      lr: 0.5\n", 1)), "stages.teacher.train.lr", "duplicate key"),
    "alias bomb": (text(BOMB), "<root>", "aliases"),
    "unknown top-level key": (put("trainig", {"steps": 10}), "trainig", "Extra inputs"),
    "no stages": (put("stages", {}), "stages", "at least 1"),
    "boolean key": (text("name: x\nstages:\n  on: {kind: teacher, method: {name: edm}, network: {arch: mlp}}\n"),
                    "stages", "the key True is not text"),
    "bad recipe name": (put("name", "toy/cd"), "name", "pattern"),
    "bad stage name": (put("stages", {"../up": {"kind": "teacher", "method": {"name": "edm"},
                                                 "network": {"arch": "mlp"}}}), "stages.../up", "letters, digits"),
    "stage name, final newline": (put("stages", {"teacher\n": {"kind": "teacher", "method": {"name": "edm"},
                                                               "network": {"arch": "mlp"}}}),
                                  "stages.teacher\\n", "letters, digits"),
    # numbers
    "nan lr": (put("stages.teacher.train.lr", NAN), "stages.teacher.train.lr", "finite"),
    "inf sigma_max": (put("noise.sigma_max", INF), "noise.sigma_max", "finite"),
    "nan method mu": (put("stages.cd.method.mu", NAN), "stages.cd.method.mu", "finite"),
    "inf in a tuple": (put("stages.teacher.train.betas", [0.9, INF]), "stages.teacher.train.betas.1", "finite"),
    "boolean as number": (put("stages.teacher.train.steps", True), "stages.teacher.train.steps", "boolean"),
    "beta of one": (put("stages.teacher.train.betas", [0.9, 1.0]), "stages.teacher.train.betas", "[0, 1)"),
    "negative seed": (put("seed", -1), "seed", "greater than or equal to 0"),
    "negative split seed": (put("data.split_seed", -3), "data.split_seed", "greater than or equal to 0"),
    # orderings that cannot hold
    "sigma_min above sigma_max": (put("noise", {"sigma_min": 90.0, "sigma_max": 80.0}), "noise.sigma_min",
                                  "below sigma_max"),
    "vp cosine offset past stretch": (put("noise", {"process": "vp_cosine", "s": 0.5, "d": 0.1}), "noise.s",
                                      "rises again"),
    "adaptive clip reversed": (put("stages.cd.method", {"name": "ctm", "gan": True,
                                                        "adversarial": {"adaptive_clip": [10.0, 0.01]}}),
                               "stages.cd.method.adversarial.adaptive_clip", "low ≤ high"),
    "ct schedule over no steps": (put({"stages.cd.method": {"name": "ct"}, "stages.cd.train.steps": 0}),
                                  "stages.cd.method.K", "defaults to train.steps"),
    "scm teacher init with t label": (put("stages.cd.method", {"name": "scm", "c_noise": "t"}),
                                      "stages.cd.method.init_from_teacher", "needs c_noise: edm"),
    "warmup longer than run": (put("stages.teacher.train.lr_warmup", 6000), "stages.teacher.train.lr_warmup",
                               "longer than the run"),
    "snapshot beyond run": (put("stages.teacher.train.snapshots", [9000]), "stages.teacher.train.snapshots",
                            "outside 1..steps"),
    "snapshot twice": (put("stages.teacher.train.snapshots", [100, 100]), "stages.teacher.train.snapshots",
                       "must not repeat"),
    "snapshot decay without snapshots": (put("stages.teacher.train.snapshot_ema_decay", 0.9),
                                         "stages.teacher.train.snapshot_ema_decay", "no snapshots"),
    "nfe repeated": (put("stages.eval.evaluate.nfe", [1, 2, 2]), "stages.eval.evaluate.nfe", "must not repeat"),
    "nfe zero": (put("stages.eval.evaluate.nfe", [0, 1]), "stages.eval.evaluate.nfe", "> 0"),
    "no teacher nfe": (put("stages.eval.evaluate.teacher_nfe", []), "stages.eval.evaluate.teacher_nfe", "at least 1"),
    "even teacher nfe": (put("stages.eval.evaluate.teacher_nfe", [1, 4]), "stages.eval.evaluate.teacher_nfe",
                         "would run as 3"),
    "seeds repeated": (put("stages.eval.evaluate.seeds", [0, 0]), "stages.eval.evaluate.seeds", "must not repeat"),
    "pr_k zero": (put("stages.eval.evaluate.pr_k", 0, "digits_cd"), "stages.eval.evaluate.pr_k", "greater than or equal to 1"),
    "pr_k not below n_samples": (put("stages.eval.evaluate", {"n_samples": 5, "pr_k": 5}, "digits_cd"),
                                 "stages.eval.evaluate.pr_k", "more than k samples"),
    "inception_fid unknown": (put("stages.eval.evaluate.inception_fid", "maybe", "digits_cd"),
                              "stages.eval.evaluate.inception_fid", "auto"),
    "inception_fid on toy data": (put("stages.eval.evaluate.inception_fid", True), "stages.eval.evaluate.inception_fid",
                                  "needs image data"),
    "inception_weights empty": (put("stages.eval.evaluate.inception_weights", "", "digits_cd"),
                                "stages.eval.evaluate.inception_weights", "at least 1 character"),
    # the stage graph: missing, wrong kind, malformed inputs
    "missing input stage": (put("stages.cd.inputs", {"teacher": "teachr"}), "stages.cd.inputs.teacher", "teachr"),
    "teacher is a pair set": (put("stages.cd.inputs", {"teacher": "pairs"}), "stages.cd.inputs.teacher",
                              "makes no model"),
    "evaluate a pair set": (put("stages.eval.inputs.models", ["teacher", "pairs"]), "stages.eval.inputs.models",
                            "makes no model"),
    "pairs from a student": (put("stages.pairs.inputs", {"teacher": "cd"}), "stages.pairs.inputs.teacher",
                             "not an EDM model"),
    "features not a classifier": (put("stages.eval.inputs.features", "teacher", "digits_cd"),
                                  "stages.eval.inputs.features", "not a feature network"),
    "images without features": (put("stages.eval.inputs", {"models": ["teacher", "cd"]}, "digits_cd"),
                                "stages.eval.inputs.features", "feature_net"),
    "empty input list": (put("stages.eval.inputs.models", []), "stages.eval.inputs.models", "empty list"),
    "input listed twice": (put("stages.eval.inputs.models", ["cd", "cd"]), "stages.eval.inputs.models",
                           "more than once"),
    "input not a name": (put("stages.cd.inputs", {"teacher": 5}), "stages.cd.inputs.teacher", "valid string"),
    # where things go
    "storage scheme": (put("storage", {"root": "gs://bucket/runs"}), "storage.root", "unsupported storage scheme 'gs'"),
    "storage file url": (put("storage", {"root": "file:///tmp/runs"}), "storage.root", "plain path"),
    "storage root is a file": (put("storage.root", lambda t: str(t / "params" / "bad.yaml")), "storage.root",
                               "is a file"),
    "tracking scheme": (put("tracking", {"uri": "ftp://host/mlflow"}), "tracking.uri", "unsupported MLflow"),
    "tracking folder missing": (put("tracking.uri", lambda t: f"sqlite:///{t}/nope/mlflow.db"), "tracking.uri",
                                "does not exist"),
    # data that could not load
    "unknown toy": (put("data.name", "9gaussians"), "data.name", "unknown toy distribution"),
    "unknown image set": (put("data", {"kind": "images", "name": "imagenet", "root": "/data"}, "digits_cd"),
                          "data.name", "unknown image dataset"),
    "images root missing": (put("data", lambda t: {"kind": "images", "name": "folder", "root": str(t / "imgs")},
                                "digits_cd"),
                            "data.root", "does not exist"),
    "cifar files missing": (put("data", lambda t: {"kind": "images", "name": "cifar10", "root": str(t)}, "digits_cd"),
                            "data.root", "cifar-10-batches-py"),
    "data scheme": (put("data", {"kind": "images", "name": "folder", "root": "gs://b/imgs"}, "digits_cd"), "data.root",
                    "unsupported data URI scheme"),
    "grey or rgb": (put("data", {"kind": "images", "name": "folder", "root": "/data", "channels": 2}, "digits_cd"),
                    "data.channels", "1 (grey) or 3"),
    "resolution for toy": (put("data.resolution", 32), "data.resolution", "'images' only"),
    # networks that could not be built
    "unet for vectors": (put("stages.teacher.network.arch", "unet"), "stages.teacher.network.arch", "image data"),
    "no unet levels": (put("stages.teacher.network", {"arch": "unet", "channel_mult": []}, "digits_cd"),
                       "stages.teacher.network.channel_mult", "at least 1"),
    "unet too deep": (put("stages.teacher.network", {"arch": "unet", "channel_mult": [1, 1, 1, 1, 1]}, "digits_cd"),
                      "stages.teacher.network.channel_mult", "divisible by 16"),
    "attention sides": (put("stages.teacher.network", {"arch": "unet", "attn_resolutions": [8, 2]}, "digits_cd"),
                        "stages.teacher.network.attn_resolutions", "cannot all be feature-map sides"),
    "attention side absent at this size": (put("stages.teacher.network", {"arch": "unet", "attn_resolutions": [16]},
                                               "digits_cd"), "stages.teacher.network.attn_resolutions",
                                           "not feature-map sides of this network at 8 pixels"),
    "no network to copy": (put("stages.teacher.network", REMOVE), "stages.teacher.network", "no `teacher` input"),
    "classifier arch": (put("stages.teacher.network.arch", "classifier"), "stages.teacher.network.arch",
                        "feature network"),
    # compute
    "workers without ray": (put("compute", {"backend": "local", "num_workers": 4}), "compute.num_workers",
                            "backend ray"),
    "batch over ray workers": (put({"compute": {"backend": "ray", "num_workers": 2},
                                    "stages.cd.train.batch_size": 255}),
                               "stages.cd.train.batch_size",
                               "does not split evenly"),
    # kinds
    "unknown stage kind": (put("stages.eval.kind", "evaluation"), "stages.eval.kind", "unknown stage kind"),
    "superres patch": (put("stages.superres.edit.k", 3, "digits_edit"), "stages.superres.edit.k", "do not tile"),
    "edit toy data": (put("stages.eval", {"kind": "edit", "inputs": {"model": "cd"}}), "stages.eval.kind",
                      "image data"),
    "2D noise source, image data": (put("stages.rf", {"kind": "teacher", "method": {"name": "rf"},
                                                      "noise": {"process": "flow", "source": "triangle"},
                                                      "network": {"arch": "unet", "layout": "lean", "width": 32,
                                                                  "depth": 1, "channel_mult": [1, 2]}}, "digits_cd"),
                                    "stages.rf.noise.source", "needs 2D toy data"),
    "guided, no unconditional teacher": (put({"data.conditional": True, "stages.ws": {
        "kind": "distill", "inputs": {"teacher": "teacher"}, "method": {"name": "guided"},
        "noise": {"process": "vp_cosine"}}}, base="digits_cd"), "stages.ws.inputs.teacher", "label_dropout > 0"),
    # a warm start whose weights could not start this stage's networks (the DM family resumes its critic)
    "warm start, other network": (put({"stages.cd.network": {"arch": "mlp", "width": 64, "depth": 3, "emb_dim": 64},
                                       "stages.cd.inputs.warm_start": "teacher"}),
                                  "stages.cd.inputs.warm_start", "another network"),
    "resumed critic, other teacher": (put({
        "stages.t2": {"kind": "teacher", "method": {"name": "edm"},
                      "network": {"arch": "mlp", "width": 64, "depth": 3, "emb_dim": 64}},
        "stages.d": {"kind": "distill", "inputs": {"teacher": "teacher"}, "method": {"name": "dmd2"}},
        "stages.r": {"kind": "distill", "inputs": {"teacher": "t2", "warm_start": "d"}, "method": {"name": "dmd2"},
                     "network": {"arch": "mlp", "width": 128, "depth": 3, "emb_dim": 64}}}),
        "stages.r.inputs.warm_start", "fake critic"),
    "resumed GAN head, other width": (put({
        "stages.d": {"kind": "distill", "inputs": {"teacher": "teacher"},
                     "method": {"name": "dmd2", "gan": True, "head_width": 32}},
        "stages.r": {"kind": "distill", "inputs": {"teacher": "teacher", "warm_start": "d"},
                     "method": {"name": "dmd2", "gan": True}}}),
        "stages.r.inputs.warm_start", "head_width"),
}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A folder holding only params/bad.yaml: the working directory, MLflow store and caches all
    point into it, so anything a failed validation wrote would show up there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env-mlflow.db'}")
    for var in ("FASTGEN_CACHE_DIR", "FASTGEN_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    (tmp_path / "params").mkdir()
    return tmp_path


def write_case(case: str, folder: Path) -> Path:
    make = CASES[case][0]
    body = make(folder)
    p = folder / "params" / "bad.yaml"
    if body is None:
        p.mkdir()
        return p
    if isinstance(body, dict):
        body = yaml.safe_dump(body, sort_keys=False)
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    return p


def assert_reported(lines: list[str], p: Path, field: str, words: str) -> None:
    """One line for the one problem: `<file>: <field path>: message` holding `words`."""
    assert lines, "nothing reported"
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{p}: {field}: ") and words in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_recipe(case, isolated, capsys, monkeypatch):
    from flows import pipeline
    from stages import cli, dvcgen, runtime

    p = write_case(case, isolated)
    _, field, words = CASES[case]
    assert cli.main(["validate", str(p)]) == 2
    assert_reported(capsys.readouterr().err.splitlines(), p, field, words)
    for run in (lambda: runtime.main([str(p), "teacher"]), lambda: cli.main(["flow", str(p)]),
                lambda: pipeline.main([str(p)])):
        assert run() == 2
        assert_reported(capsys.readouterr().err.splitlines(), p, field, words)
    monkeypatch.setattr(dvcgen, "PROJECT", isolated)  # dvcgen reads params/*.yaml under the project
    assert dvcgen.main([]) == 2
    assert_reported(capsys.readouterr().err.splitlines(), p.relative_to(isolated), field, words)
    assert sorted(x.name for x in isolated.iterdir()) == ["params"]
    assert sorted(x.name for x in (isolated / "params").iterdir()) == ["bad.yaml"]


def test_kinds_covered():
    """At least 30 cases, of different kinds (file, numbers, orderings, graph, places, data,
    networks, compute)."""
    assert len(CASES) >= 30
    fields = {f.split(".")[0] for _, f, _ in CASES.values()}
    assert {"<file>", "<root>", "stages", "data", "storage", "tracking", "compute", "noise", "seed"} <= fields


def test_every_problem_one_line_each(isolated, capsys):
    """Several independent problems: each reported on its own line, none twice."""
    raw = copy.deepcopy(BASES["toy_cd"])
    raw["stages"]["cd"]["inputs"] = {"teacher": "pairs"}
    raw["stages"]["eval"]["evaluate"]["seeds"] = [1, 1]
    raw["storage"] = {"root": "gs://x/y"}
    p = isolated / "params" / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    from stages import cli

    assert cli.main(["validate", str(p)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in lines] == ["stages.eval.evaluate.seeds", "storage.root"]
    raw["stages"]["eval"]["evaluate"]["seeds"] = [1]
    raw["storage"] = {"root": "outputs"}
    raw["data"]["name"] = "moons"
    p.write_text(yaml.safe_dump(raw))
    assert cli.main(["validate", str(p)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert sorted(line.split(": ")[1] for line in lines) == ["data.name", "stages.cd.inputs.teacher"]


def test_same_name_same_storage_refused(isolated, capsys):
    """Two recipe files with one name and one storage root would write the same outputs."""
    from stages import cli

    a, b = isolated / "params" / "a.yaml", isolated / "params" / "b.yaml"
    for f in (a, b):
        f.write_text((ROOT / "params/toy_cd.yaml").read_text())
    assert cli.main(["validate", str(a), str(b)]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"{b}: name: recipe 'toy_cd' is also the name of {a} with the same storage.root: both would write "
        "outputs/toy_cd/ and the same DVC stages"]
    assert out.out.startswith(f"{a}: ok")


@pytest.mark.parametrize("entry", [["-m", "stages.run", "{p}", "teacher"], ["-m", "stages.cli", "flow", "{p}"]])
def test_subprocess_writes_nothing(entry, isolated):
    """As `dvc repro` and a user run them: exit 2, the one line, and nothing written anywhere
    under the folder, which is also HOME and TMPDIR (Prefect would make ~/.prefect on import)."""
    p = write_case("duplicate nested key", isolated)
    env = {**os.environ, "HOME": str(isolated), "TMPDIR": str(isolated), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *[a.format(p=p) for a in entry]], cwd=isolated, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert_reported(r.stderr.splitlines(), p, "stages.teacher.train.lr", "duplicate key")
    assert sorted(x.name for x in isolated.iterdir()) == ["params"]
