"""Faults, with real processes: a stage killed (SIGKILL) during training, during the S3 upload of
its outputs and while logging to MLflow; a non-finite loss; two `dvc repro` and two Prefect flows
of the same recipe at once.

Each killed stage is a `python -m stages.run` process stopped at a known moment: the pause points
of stages/timing.py make it wait there until the test kills it. Afterwards nothing half-written is
consumed (no manifest, so no consumer takes it), the rerun's output has the content digests of an
uninterrupted run, and the killed attempt's MLflow run ends KILLED, not RUNNING forever.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fastgen_core import artifacts
from stages import storage
from stages.recipe import load_recipe
from stages.runtime import PROJECT, main as stage_main, run_stage, stage_dir

# the tiny teacher, shorter: a checkpoint at step 40, logs every 20 steps (the `train` pause point
# holds at step 60, with the step-40 checkpoint written)
TEACHER = {"teacher": {"train": {"steps": 120, "ckpt_every": 40, "log_every": 20}}}
# a learning rate at which the tiny teacher's loss turns NaN within a few steps (Adam steps of 1e4)
DIVERGES = {"teacher": {"train": {"steps": 60, "lr": 1.0e4, "ckpt_every": 1, "log_every": 10}}}


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(PROJECT), **extra}
    env.pop("FASTGEN_INVOCATION", None)
    return env


def _start(cmd: list[str], log: Path, cwd: Path = PROJECT, pause: str | None = None, flag: Path | None = None,
           env: dict | None = None) -> subprocess.Popen:
    """A process whose stdout and stderr go to `log`; with `pause`, it stops at that pause point."""
    extra = {"FASTGEN_PAUSE_AT": pause, "FASTGEN_PAUSE_FILE": str(flag)} if pause else {}
    return subprocess.Popen(cmd, cwd=cwd, env={**(env or _env()), **extra}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stage(path: Path, stage: str, log: Path, **kw) -> subprocess.Popen:
    return _start([sys.executable, "-m", "stages.run", str(path), stage], log, **kw)


def _wait(cond, what: str, procs: list[subprocess.Popen], log: Path, timeout: float = 150) -> None:
    """Poll `cond` until it holds; fail with the log if a process ends first or time runs out."""
    t_end = time.monotonic() + timeout
    while not cond():
        ended = [p for p in procs if p.poll() is not None]
        if ended or time.monotonic() > t_end:
            pytest.fail(f"{what}: {'a process ended' if ended else 'timed out'}\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


def _runs(recipe, stage: str) -> dict[str, list]:
    """The MLflow runs of `stage`, by status."""
    from mlflow import MlflowClient

    client = MlflowClient(recipe.tracking.uri)
    exp = client.get_experiment_by_name(recipe.name).experiment_id
    out: dict[str, list] = {}
    for r in client.search_runs([exp], f"tags.`fastgen.stage` = '{stage}'"):
        out.setdefault(r.info.status, []).append(r)
    return out


def _killed_run(recipe, stage: str, pid: int):
    """The one run of `stage` left by the killed process `pid`: KILLED, with its reason, and its
    parent (the invocation the process ran) KILLED too."""
    from mlflow import MlflowClient

    (run,) = _runs(recipe, stage)["KILLED"]
    assert f":{pid}:" in run.data.tags["fastgen.process"]
    assert "killed" in run.data.tags["fastgen.failure"]
    parent = MlflowClient(recipe.tracking.uri).get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    return run


@pytest.fixture(scope="module")
def uninterrupted(tiny_recipe_session):
    """The content digest of the short teacher, run once without interruption."""
    recipe = load_recipe(tiny_recipe_session("faults-clean", only=["teacher"], stages=TEACHER))
    return SimpleNamespace(digest=run_stage(recipe, "teacher")["digest"])


def test_killed_in_training_a_waiting_rerun_resumes_to_identical_outputs(tiny_recipe, tmp_path, uninterrupted):
    """Process A is killed mid-training (checkpoint at step 40 written) while process B, started on
    the same stage, waits for A's lock; B then resumes from A's checkpoint, and its output has the
    digest of an uninterrupted run. A's MLflow run ends KILLED; nothing of A is left around."""
    path = tiny_recipe(only=["teacher"], stages=TEACHER)
    recipe = load_recipe(path)
    flag, alog, blog = tmp_path / "pause", tmp_path / "a.log", tmp_path / "b.log"
    out = stage_dir(recipe, "teacher")
    a = _stage(path, "teacher", alog, pause="train", flag=flag)
    b = None
    try:
        _wait((out.parent / ".partial" / "teacher.lock").exists, "A holds the stage's lock", [a], alog)
        b = _stage(path, "teacher", blog)  # starts up while A trains
        _wait(flag.exists, "A paused in training", [a, b], alog)
        assert not out.exists()  # nothing published before the stage ends
        (running,) = _runs(recipe, "teacher")["RUNNING"]
        _wait(lambda: "waiting for it to finish" in blog.read_text(), "B waits for A", [a, b], blog)
        assert f"process {a.pid} (since " in blog.read_text()
        _kill(a)
        assert b.wait(180) == 0, blog.read_text()[-3000:]
    finally:
        _kill(a, *([b] if b else []))
    log = blog.read_text()
    assert "resuming from step 40 of 120" in log and "Traceback" not in log
    m = artifacts.verify(out)
    assert m["digest"] == uninterrupted.digest
    assert _killed_run(recipe, "teacher", a.pid).info.run_id == running.info.run_id
    (done,) = _runs(recipe, "teacher")["FINISHED"]
    assert m["mlflow"]["run_id"] == done.info.run_id and done.data.tags["fastgen.resumed_from_step"] == "40"
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher"]  # no temporary folder, lock or partial


def test_killed_during_s3_upload_is_never_consumed_and_rerun_completes_it(s3_server, tiny_recipe, tmp_path,
                                                                       monkeypatch, uninterrupted, clean_invocation):
    """Killed with one of the model's files uploaded and no manifest: the artifact is refused as
    incomplete; the rerun publishes the same content as an uninterrupted run."""
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    root = f"{s3_server.url}/{uuid.uuid4().hex[:8]}/outputs"
    path = tiny_recipe(only=["teacher"], stages=TEACHER, storage={"root": root})
    recipe = load_recipe(path)
    uri = storage.location(recipe, "teacher")
    flag, log = tmp_path / "pause", tmp_path / "a.log"
    a = _stage(path, "teacher", log, pause="upload", flag=flag)
    try:
        _wait(flag.exists, "paused in the upload", [a], log)
        import s3fs

        assert [k.rsplit("/", 1)[1] for k in s3fs.S3FileSystem().find(uri)] == ["model.json"]
        _kill(a)
    finally:
        _kill(a)
    for check in (storage.fetch, storage.verify):
        with pytest.raises(artifacts.DigestMismatch, match=r"no manifest.json \(incomplete"):
            check(uri)
    m = run_stage(recipe, "teacher")
    assert m["digest"] == storage.verify(uri)["digest"] == uninterrupted.digest
    _killed_run(recipe, "teacher", a.pid)


def test_killed_while_logging_to_mlflow_the_stage_runs_again(tiny_recipe, tmp_path, uninterrupted, capfd,
                                                             clean_invocation):
    """Killed with its output published but its MLflow lineage half logged: the output is complete
    (it verifies), but its run is not, so the rerun marks that run KILLED and runs the stage again,
    to the same content and a run with the whole lineage."""
    path = tiny_recipe(only=["teacher"], stages=TEACHER)
    recipe = load_recipe(path)
    flag, log = tmp_path / "pause", tmp_path / "a.log"
    a = _stage(path, "teacher", log, pause="mlflow", flag=flag)
    try:
        _wait(flag.exists, "paused in MLflow logging", [a], log)
        first = artifacts.verify(stage_dir(recipe, "teacher"))
        assert first["digest"] == uninterrupted.digest
        _kill(a)
    finally:
        _kill(a)
    capfd.readouterr()
    m = run_stage(recipe, "teacher")
    assert "killed while logging to MLflow" in capfd.readouterr().err
    killed = _killed_run(recipe, "teacher", a.pid)
    assert killed.info.run_id == first["mlflow"]["run_id"] and "fastgen.logged_model" not in killed.data.tags
    (done,) = _runs(recipe, "teacher")["FINISHED"]
    assert m["digest"] == uninterrupted.digest and m["mlflow"]["run_id"] == done.info.run_id
    assert done.data.tags["fastgen.logged_model"]


def _only_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


NONFINITE = re.compile(r"stages\.teacher: non-finite loss \((nan|inf|-inf)\) at step (\d+) in optimiser group "
                       r"'net'; last finite checkpoint \(step (\d+)\) kept in (\S+/last\.pt); a rerun with unchanged "
                       r"settings resumes from it, changed settings start afresh$")


def test_nonfinite_loss_stops_with_one_line_and_a_fixed_rerun_starts_afresh(tiny_recipe, tmp_path, capfd,
                                                                          clean_invocation):
    """Exit 2 with one line naming the stage, step, group and the kept checkpoint; the run ends
    FAILED with that line; nothing is published. Rerun unchanged: it resumes from the checkpoint
    (and fails at the same step). Rerun with the learning rate fixed: a new params digest, a fresh
    start, and the output of a clean run of the fixed recipe."""
    path = tiny_recipe(only=["teacher"], stages=DIVERGES)
    recipe = load_recipe(path)
    capfd.readouterr()
    assert stage_main([str(path), "teacher"]) == 2
    line = _only_error_line(capfd.readouterr().err)
    got = NONFINITE.search(line)
    assert got, line
    step, kept, ckpt = int(got[2]), int(got[3]), Path(got[4])
    assert kept == step >= 1 and torch.load(ckpt, weights_only=True)["step"] == kept  # checkpoint every step
    assert not stage_dir(recipe, "teacher").exists()
    (failed,) = _runs(recipe, "teacher")["FAILED"]
    assert line == f"error: {failed.data.tags['fastgen.failure']}"

    assert stage_main([str(path), "teacher"]) == 2
    err = capfd.readouterr().err
    assert f"resuming from step {kept} of 60" in err and _only_error_line(err) == line

    raw = yaml.safe_load(path.read_text())
    raw["stages"]["teacher"]["train"]["lr"] = 3.0e-3
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert stage_main([str(path), "teacher"]) == 0
    assert "resuming" not in capfd.readouterr().err
    fixed = artifacts.verify(stage_dir(recipe, "teacher"))
    clean = tiny_recipe(tmp_path / "clean", only=["teacher"], stages=raw["stages"])
    assert fixed["digest"] == run_stage(load_recipe(clean), "teacher")["digest"]
    assert not ckpt.parent.exists()  # the diverged attempt's checkpoint went with the fixed run's success


def test_two_dvc_repro_at_once_one_refuses_and_the_outputs_stay_whole(tmp_path, mlflow_template):
    """While one `dvc repro` runs the stage (held at a pause point), a second one of the same
    recipe stops at once with DVC's lock message (its lock on the stage's outputs) and writes
    nothing; the first then completes, and DVC finds everything up to date."""
    from conftest import write_tiny_recipe

    repo = tmp_path / "repo"
    for sub in ("fastgen_core", "stages", "flows"):
        shutil.copytree(PROJECT / sub, repo / sub, ignore=shutil.ignore_patterns("__pycache__"))
    write_tiny_recipe(repo / "params", ["teacher"], mlflow_template, stages=TEACHER, storage={"root": "outputs"})
    (repo / ".gitignore").write_text("params/mlflow.db\nparams/mlruns/\n__pycache__/\n")
    env = _env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in ([sys.executable, "-m", "stages.dvcgen"], ["git", "init", "-q"], ["dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    flag, alog = tmp_path / "pause", tmp_path / "a.log"
    a = _start(["dvc", "repro"], alog, cwd=repo, pause="train", flag=flag, env=env)
    try:
        _wait(flag.exists, "the first dvc repro paused in training", [a], alog)
        b = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert b.returncode != 0
        said = b.stdout + b.stderr  # DVC's lock on the stage's outputs, naming the first repro
        assert "outputs/tiny_cd/teacher' is busy, it is being blocked by" in said and f"(PID {a.pid})" in said, said
        assert not (repo / "outputs/tiny_cd/teacher").exists()
        flag.unlink()  # the first goes on
        assert a.wait(180) == 0, alog.read_text()[-3000:]
    finally:
        _kill(a)
    m = artifacts.verify(repo / "outputs/tiny_cd/teacher")
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert "up to date" in status.stdout.lower(), status.stdout + status.stderr
    assert m["params_digest"] == load_recipe(repo / "params/tiny_cd.yaml").digest("teacher")


def test_two_flows_of_one_recipe_at_once_run_each_stage_once(prefect_harness, tiny_recipe, tmp_path, capfd,
                                                           monkeypatch):
    """Two flow runs of the same recipe at once (two threads; the first to train the teacher is
    held there until the other is seen waiting): each stage runs once, in whichever flow takes its
    lock first, and the other flow finds it up to date. Both flows end with the same digests; every
    output verifies; no run is left RUNNING."""
    from flows.pipeline import pipeline
    from stages import timing

    path = tiny_recipe(only=["teacher", "pairs"], stages=TEACHER)
    flag = tmp_path / "pause"
    monkeypatch.setenv("FASTGEN_PAUSE_AT", "train")
    monkeypatch.setenv("FASTGEN_PAUSE_FILE", str(flag))
    monkeypatch.setattr(timing, "_paused", set())
    results: dict[int, dict] = {}

    def flow(i):
        results[i] = pipeline(load_recipe(path), recipe_path=str(path))

    capfd.readouterr()
    threads = [threading.Thread(target=flow, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    err, t_end = "", time.monotonic() + 150
    # the holder pauses at its first checkpoint (it writes `flag`), the other may start waiting before
    while not ("is running this stage; waiting for it to finish" in err and flag.exists()) \
            and time.monotonic() < t_end:
        time.sleep(0.1)
        err += capfd.readouterr().err
    flag.unlink(missing_ok=True)  # the held flow goes on
    for t in threads:
        t.join(300)
    err += capfd.readouterr().err
    assert "tiny_cd/teacher: process" in err and "is running this stage; waiting for it to finish" in err, err[-3000:]
    recipe = load_recipe(path)
    assert sorted(results) == [0, 1] and results[0] == results[1]
    for s in ("teacher", "pairs"):
        assert err.count(f"tiny_cd/{s}: done in") == 1 and err.count(f"tiny_cd/{s}: up to date") == 1, err[-3000:]
        assert artifacts.verify(stage_dir(recipe, s))["digest"] == results[0][s]["digest"]
        assert set(_runs(recipe, s)) == {"FINISHED"} and len(_runs(recipe, s)["FINISHED"]) == 1


def test_flow_reports_a_failed_stage_as_failed_with_its_line(prefect_harness, tiny_recipe, capfd):
    """A stage that cannot run (non-finite loss) ends its task and the flow run Failed with the
    stage's one line; later stages never start; `fastgen flow` exits 2 with that line."""
    from prefect.client.schemas.objects import StateType

    from flows.pipeline import main as flow_main, pipeline

    path = tiny_recipe(only=["teacher", "pairs"], stages=DIVERGES)
    recipe = load_recipe(path)
    state = pipeline(recipe, recipe_path=str(path), return_state=True)
    assert state.type == StateType.FAILED
    assert NONFINITE.search(state.message) and state.message.startswith("stage 'teacher': ")
    assert "\n" not in state.message and not stage_dir(recipe, "pairs").exists()
    capfd.readouterr()
    assert flow_main([str(path)]) == 2
    assert _only_error_line(capfd.readouterr().err) == f"error: {state.message}"
