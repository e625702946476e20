"""Overrides and sweep grids (stages/sweep.py) and stage reuse across a sweep's trials
(stages/reuse.py), without a server (the sweep through a real Prefect server and worker is in
tests/test_deploy.py).

- An override means what `dvc exp run -S` makes of it: compared with DVC's own implementation
  (`dvc.utils.hydra.apply_overrides`, which edits a params file) on a shipped recipe.
- Every trial of a grid is validated before any is submitted, and each bad one is named.
- With a shared reuse folder, a stage with the same params and inputs is computed once: a second
  storage root gets a verified copy of the same artifact; a different setting runs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.recipe import RecipeError
from stages.sweep import apply_overrides, load_with_overrides, parse_grid, parse_sets, trials, validate_trials

ROOT = Path(__file__).resolve().parent.parent

SETS = ["stages.cd.method.N=12", "stages.cd.train.lr=3e-4", "seed=7", "stages.eval.evaluate.seeds=[0,5]",
        "stages.cd.method.metric=lpips", "+stages.cd.train.lr_warmup=5", "~description", "data.n_train=123"]


def test_overrides_mean_what_dvc_exp_run_S_makes_of_them(tmp_path):
    from dvc.utils.hydra import apply_overrides as dvc_apply

    src = ROOT / "params/toy_cd.yaml"
    raw = yaml.safe_load(src.read_text())
    raw.setdefault("description", "x")
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    dvc_apply(f, SETS)
    assert apply_overrides(raw, parse_sets(SETS), "p.yaml") == yaml.safe_load(f.read_text())


def test_text_values_are_read_with_the_same_grammar():
    # a form sends text: "3e-4" is a number, "[0, 5]" a list, as on the -S command line
    assert apply_overrides({"a": {"b": 1}}, {"a.b": "3e-4", "a.c": "[0, 5]", "a.d": "true"}, "x") == \
        {"a": {"b": 3e-4, "c": [0, 5], "d": True}}


def test_grid_is_the_cartesian_product_in_key_order():
    grid = parse_grid(["stages.cd.method.N=6,10", "stages.cd.train.lr=range(1,4)", "seed=3"])
    assert grid == {"stages.cd.method.N": [6, 10], "stages.cd.train.lr": [1, 2, 3], "seed": [3]}
    ts = trials(grid)
    assert len(ts) == 6 and ts[0] == {"stages.cd.method.N": 6, "stages.cd.train.lr": 1, "seed": 3}
    assert ts[-1] == {"stages.cd.method.N": 10, "stages.cd.train.lr": 3, "seed": 3}
    with pytest.raises(RecipeError, match="a sweep"):
        parse_sets(["stages.cd.method.N=6,10"])


def test_every_trial_is_validated_and_each_bad_one_named():
    grid = parse_grid(["stages.cd.method.N=6,abc", "stages.cd.train.lr=1e-3,-1"])
    with pytest.raises(RecipeError) as e:
        validate_trials("toy_cd", grid)
    probs = e.value.problems
    # 3 of the 4 trials are bad: one line per bad field, each naming its trial and the field path
    assert len(probs) == 4, probs
    assert sum("overrides): stages.cd.method.N: " in p for p in probs) == 2
    assert sum("overrides): stages.cd.train.lr: " in p for p in probs) == 2
    assert all(p.startswith('trial {"stages.cd.method.N": ') and "params/toy_cd.yaml (with -S overrides)" in p
               for p in probs), probs
    assert not any('"stages.cd.method.N": 6, "stages.cd.train.lr": 0.001}' in p for p in probs)


def test_sweep_cli_refuses_a_bad_grid_before_contacting_prefect(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # must stay untouched
    r = subprocess.run([sys.executable, "-m", "stages.cli", "sweep", "toy_cd", "-S", "stages.cd.method.N=6,abc"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "stages.cd.method.N" in r.stderr and "abc" in r.stderr, r.stderr
    assert not (tmp_path / "prefect").exists()


def test_sweep_cli_needs_the_server_that_holds_the_deployments(monkeypatch, capsys):
    from stages.sweep import cli_args

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli_args(["toy_cd", "-S", "stages.cd.method.N=6,8"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert cli_args(["toy_cd", "-S", "stages.cd.method.N=6,8", "--max-parallel", "3"]) == \
        ("toy_cd", {"stages.cd.method.N": [6, 8]}, 3, 90.0, 1000)
    # a limit within the trials' heartbeat period would take live trials as lost
    assert cli_args(["toy_cd", "-S", "stages.cd.method.N=6,8", "--lost-after", "30"]) == 2
    assert "heartbeat" in capsys.readouterr().err


def test_a_grid_over_the_trial_limit_is_refused_at_once(monkeypatch, capsys):
    """A typo such as range(1,100000) is one line before any trial is validated or submitted,
    from the CLI and from the sweep flow (the UI's path) alike; a raised limit lets it through."""
    import time

    from prefect.logging import disable_run_logger

    from flows.sweep import sweep
    from stages.sweep import cli_args

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")  # never contacted
    t0 = time.perf_counter()
    assert cli_args(["toy_cd", "-S", "stages.cd.method.N=range(1,100001)", "-S", "seed=1,2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == ["fastgen sweep: the grid has 200000 trials (100000 (stages.cd.method.N) x 2 (seed)), more than "
                   "the limit of 1000: narrow it, or raise the limit (--max-trials; the sweep flow's max_trials)"], err
    assert time.perf_counter() - t0 < 5  # validating 200 000 trials would take minutes
    assert cli_args(["toy_cd", "-S", "seed=range(0,5)", "--max-trials", "4"]) == 2
    assert "5 trials" in capsys.readouterr().err
    assert cli_args(["toy_cd", "-S", "seed=range(0,5)", "--max-trials", "5"])[4] == 5
    with disable_run_logger():  # the flow's body alone: it fails before Prefect's API is used
        state = sweep.fn("toy_cd", {"seed": list(range(1001))})
    assert state.is_failed() and "1001 trials" in state.message


def test_identical_stage_of_another_trial_is_reused_not_rerun(tmp_path, monkeypatch, capfd):
    from conftest import write_tiny_recipe
    from fastgen_core import artifacts
    from stages.runtime import run_stage, stage_dir

    monkeypatch.setenv("FASTGEN_REUSE_DIR", str(tmp_path / "reuse"))
    small = {"stages": {"teacher": {"train": {"steps": 20}}}, "tracking": {"enabled": False}}
    a = load_with_overrides(str(write_tiny_recipe(tmp_path / "a", ["teacher"], **small)))
    b = load_with_overrides(str(write_tiny_recipe(tmp_path / "b", ["teacher"], **small)))
    c = load_with_overrides(str(write_tiny_recipe(tmp_path / "c", ["teacher"], **small)),
                            {"stages.teacher.train.lr": 1e-3})
    ma = run_stage(a, "teacher")
    capfd.readouterr()
    mb = run_stage(b, "teacher")
    assert "reused the identical output" in capfd.readouterr().err
    assert stage_dir(b, "teacher") != stage_dir(a, "teacher")
    assert artifacts.verify(stage_dir(b, "teacher")) == ma == mb  # same files, same manifest: made once
    mc = run_stage(c, "teacher")  # another setting: its own run
    assert "reused" not in capfd.readouterr().err
    assert mc["params_digest"] != ma["params_digest"] and mc["created"] >= ma["created"]
    # without the reuse folder (dvc repro, a single flow run) nothing is shared across roots
    monkeypatch.delenv("FASTGEN_REUSE_DIR")
    shutil.rmtree(stage_dir(b, "teacher"))
    run_stage(b, "teacher")
    assert "reused" not in capfd.readouterr().err
