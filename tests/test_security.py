"""Security: checkpoints load without executing pickled code, credentials are scrubbed from what
is logged, and the servers the project starts listen on 127.0.0.1 only. (The planted-secret test
over a whole pipeline run is in test_lineage_mlflow.py, where that run is made.)"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fastgen_core import artifacts
from stages.recipe import load_recipe
from stages import tracking
from stages.runtime import PROJECT, run_stage, stage_dir


class _Payload:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"step": 3, "nets": _Payload(marker)}))
    # the payload is live: a plain unpickle would have run it
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    probe.unlink()


@pytest.fixture
def teacher_only(tiny_recipe, clean_invocation):
    return load_recipe(tiny_recipe(only=["teacher", "pairs"], tracking={"enabled": False},
                                   stages={"teacher": {"train": {"steps": 20, "ckpt_every": 10}}}))


def test_resuming_from_a_malicious_checkpoint_is_refused(teacher_only, tmp_path):
    r = teacher_only
    partial = stage_dir(r, "teacher").parent / ".partial" / f"teacher-{r.digest('teacher')[:16]}"
    partial.mkdir(parents=True)
    marker = tmp_path / "pwned"
    _malicious_pickle(partial / "last.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="last.pt: not a tensors-only checkpoint, refusing"):
        run_stage(r, "teacher")
    assert not marker.exists()
    assert not stage_dir(r, "teacher").exists()  # nothing written


def test_a_model_whose_weights_are_a_pickle_is_refused(teacher_only, tmp_path):
    r = teacher_only
    run_stage(r, "teacher")
    out = stage_dir(r, "teacher")
    marker = tmp_path / "pwned"
    _malicious_pickle(out / "model.safetensors", marker)
    # an attacker able to write the folder can rewrite its manifest too: digests then match
    m = artifacts.read_manifest(out)
    artifacts.write_manifest(out, {k: v for k, v in m.items() if k not in ("files", "digest")})
    with pytest.raises(ValueError, match=r"teacher/model.safetensors: not a safetensors file, refusing to load it"):
        run_stage(r, "pairs")
    assert not marker.exists()
    assert not stage_dir(r, "pairs").exists()


def test_resumed_weights_that_are_a_pickle_are_refused(tmp_path):
    """resume.safetensors (a DM-family critic's live weights, read by a warm-started stage) is
    loaded like the model: tensors only, a pickle in its place refused and never run."""
    from fastgen_core.models import RESUME, load_resume

    marker = tmp_path / "pwned"
    _malicious_pickle(tmp_path / RESUME, marker)
    with pytest.raises(ValueError, match=r"resume.safetensors: not a safetensors file, refusing to load it"):
        load_resume(tmp_path)
    assert not marker.exists()


def test_scrub_removes_env_secrets_and_url_passwords(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_API_TOKEN", "tok-4f9a7c2e")
    monkeypatch.setenv("HARMLESS_SETTING", "visible-value")
    s = tracking.scrub("uri=https://alice:hunter2pw@mlflow.example:5000/x token tok-4f9a7c2e visible-value")
    assert s == "uri=https://***@mlflow.example:5000/x token *** visible-value"
    assert tracking.scrub("s3://bucket/prefix") == "s3://bucket/prefix"
    # a secret key holding `/` and `+`, a raw `@` in a password, a bare token as the user part
    assert tracking.scrub("s3://AKIAX:ab/cd+ef@bucket/p") == "s3://***@bucket/p"
    assert tracking.scrub("see https://u:pa@ss@h/x now") == "see https://***@h/x now"
    assert tracking.scrub("https://tok123456@h/api") == "https://***@h/api"


class _Unsetting(dict):
    """An environment in which a variable is unset by another thread between listing and reading it
    (MLflow's telemetry thread unsets _MLFLOW_TELEMETRY_SESSION_ID while a run is logged)."""

    def __getitem__(self, k):
        if k == "GONE_API_TOKEN":
            raise KeyError(k)
        return super().__getitem__(k)

    def items(self):
        return ((k, self[k]) for k in list(self))

    def get(self, k, default=None):
        try:
            return self[k]
        except KeyError:
            return default


def test_scrub_survives_a_variable_unset_while_it_reads_the_environment(monkeypatch):
    env = _Unsetting({"SOME_SERVICE_API_TOKEN": "tok-4f9a7c2e", "GONE_API_TOKEN": "gone-123456", "HOME": "/root"})
    monkeypatch.setattr(tracking.os, "environ", env)
    assert tracking.scrub("token tok-4f9a7c2e gone-123456") == "token *** gone-123456"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) listening on `port`."""
    out = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(f).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                out.add(addr)
    return out


def test_mlflow_server_script_binds_loopback_only(tmp_path, mlflow_template):
    import shutil

    shutil.copy(mlflow_template, tmp_path / "srv.db")  # migrated already: starts in seconds
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_HOST"}
    env.update(MLFLOW_PORT=str(port), MLFLOW_WORKERS="1", MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path / 'srv.db'}",
               MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "art"), PATH=f"{PROJECT / '.venv' / 'bin'}:{env['PATH']}")
    proc = subprocess.Popen(["bash", str(PROJECT / "infra" / "mlflow-server.sh")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not _listeners(port):
            assert proc.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not listen within 120 s"
            time.sleep(0.5)
        # 127.0.0.1 only: not 0.0.0.0 (IPv4 any) nor :: (IPv6 any)
        assert _listeners(port) == {"0100007F"}
    finally:
        os.killpg(proc.pid, 9)  # the server's whole process group (its uvicorn workers too)
        proc.wait(timeout=30)


def test_a_tracking_uri_in_an_error_message_is_scrubbed(tmp_path, monkeypatch, capsys):
    from stages import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://alice:s3cretpw@mlflow.example/x")
    (tmp_path / "params").mkdir()
    (tmp_path / "params/toy_cd.yaml").write_text((PROJECT / "params/toy_cd.yaml").read_text())
    assert cli.main(["validate", "params/toy_cd.yaml"]) == 2
    err = capsys.readouterr().err
    assert "tracking.uri: $MLFLOW_TRACKING_URI 'ftp://***@mlflow.example/x'" in err and "s3cretpw" not in err, err
