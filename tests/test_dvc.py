"""`dvc repro` on a real git + DVC repository in a temp dir: the generated DAG runs end to end,
a second repro runs nothing, and changing one student's setting reruns that student and its
evaluation only; `dvc push` to an S3 remote and `dvc pull` into a fresh clone restore every output."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"kind": "toy", "name": "8gaussians", "n_train": 2000, "n_test": 500},
    "stages": {
        "teacher": {"kind": "teacher", "method": {"name": "edm"},
                    "network": {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16},
                    "train": {"steps": 60, "batch_size": 128, "log_every": 20}},
        "pairs": {"kind": "ode_pairs", "inputs": {"teacher": "teacher"}, "pairs": {"n_pairs": 200, "steps": 4}},
        "cd": {"kind": "distill", "inputs": {"teacher": "teacher"}, "method": {"name": "cd", "N": 8},
               "train": {"steps": 40, "batch_size": 128, "log_every": 20}},
        "eval": {"kind": "evaluate", "inputs": {"models": ["teacher", "cd"], "pairs": "pairs"},
                 "evaluate": {"n_samples": 200, "seeds": [0], "nfe": [1], "teacher_nfe": [3], "plots": False}},
    },
}


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("dvcrepo")
    for sub in ("fastgen_core", "stages", "flows"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (d / "params").mkdir()
    # tracking off: MLflow from `dvc repro`'s stage processes is tested in test_dvc_exp.py, and costs
    # each stage process here ~2 s of CPU
    recipe = dict(TINY, tracking={"enabled": False})
    (d / "params/tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (d / ".gitignore").write_text("__pycache__/\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(d),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "DVC_NO_ANALYTICS": "1"}
    env.pop("FASTGEN_INVOCATION", None)
    sh([sys.executable, "-m", "stages.dvcgen"], d, env)
    sh(["git", "init", "-q"], d, env)
    sh(["dvc", "init", "-q"], d, env)
    sh(["git", "add", "-A"], d, env)
    sh(["git", "commit", "-qm", "init"], d, env)
    return d, env


def test_generated_dag_matches_recipe(repo):
    d, _ = repo
    stages = yaml.safe_load((d / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["tiny-teacher", "tiny-pairs", "tiny-cd", "tiny-eval"]
    assert "outputs/tiny/teacher" in stages["tiny-cd"]["deps"]
    assert stages["tiny-cd"]["params"] == [{"params/tiny.yaml": ["seed", "data", "stages.cd"]}]
    # the flat summary, git-tracked so `dvc exp` carries it (the full metrics.json stays in outputs/)
    assert stages["tiny-eval"]["metrics"] == [{"metrics/tiny-eval.json": {"cache": False}}]


def test_repro_then_nothing_then_only_the_changed_student(repo):
    d, env = repo
    first = sh(["dvc", "repro"], d, env)
    assert ran(first) == {"tiny-teacher", "tiny-pairs", "tiny-cd", "tiny-eval"}
    m = yaml.safe_load((d / "outputs/tiny/eval/metrics.json").read_text())
    assert set(m) == {"teacher", "cd"} and "nfe_1" in m["cd"]

    second = sh(["dvc", "repro"], d, env)
    assert ran(second) == set()
    assert "up to date" in second.lower()

    teacher_digest = yaml.safe_load((d / "outputs/tiny/teacher/manifest.json").read_text())["digest"]
    p = d / "params/tiny.yaml"
    recipe = yaml.safe_load(p.read_text())
    recipe["stages"]["cd"]["train"]["lr"] = 5e-4
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    third = sh(["dvc", "repro"], d, env)
    assert ran(third) == {"tiny-cd", "tiny-eval"}
    assert yaml.safe_load((d / "outputs/tiny/teacher/manifest.json").read_text())["digest"] == teacher_digest
    shown = sh(["dvc", "metrics", "show"], d, env)
    assert "metrics/tiny-eval.json" in shown and "failed to load" not in shown


def test_dvc_yaml_is_up_to_date():
    r = subprocess.run([sys.executable, "-m", "stages.dvcgen", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_push_to_s3_remote_then_pull_into_a_fresh_clone(repo, s3_server, tmp_path):
    """`dvc push` to an S3 remote (moto on 127.0.0.1; endpoint and credentials from the AWS
    variables only) and `dvc pull` in a fresh `git clone` restore every output bit for bit; `dvc
    repro` there runs nothing."""
    from fastgen_core import artifacts

    d, env = repo
    env = {**env, **s3_server.env}
    sh(["dvc", "repro"], d, env)  # whatever state the tests before left: everything up to date
    remote = f"{s3_server.url}/dvc-{tmp_path.name}"
    sh(["dvc", "remote", "add", "-f", "-d", "store", remote], d, env)
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in (d / ".dvc/config").read_text()
    sh(["git", "add", "-A"], d, env)
    sh(["git", "commit", "-qm", "outputs on the S3 remote"], d, env)
    pushed = sh(["dvc", "push"], d, env)
    assert "pushed" in pushed
    import s3fs

    assert s3fs.S3FileSystem().find(remote)  # the objects are on the moto server

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(d), str(clone)], tmp_path, env)
    stages = ["teacher", "pairs", "cd", "eval"]
    assert not any((clone / f"outputs/tiny/{s}/manifest.json").exists() for s in stages)
    sh(["dvc", "pull"], clone, {**env, "PYTHONPATH": str(clone)})
    for s in stages:
        here = artifacts.verify(d / f"outputs/tiny/{s}")
        there = artifacts.verify(clone / f"outputs/tiny/{s}")  # every file matches its manifest
        assert there["digest"] == here["digest"] and there["files"] == here["files"], s
    again = sh(["dvc", "repro"], clone, {**env, "PYTHONPATH": str(clone)})
    assert ran(again) == set(), again
    assert "up to date" in again.lower()
