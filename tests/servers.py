"""Real servers for the tests, bound to 127.0.0.1 on free ports, one of each per test session:

- `s3_server`: moto in server mode (an S3-compatible endpoint) with one bucket; the standard AWS
  variables (fake credentials, region, AWS_ENDPOINT_URL) are set for the session, so s3fs, DVC's
  S3 remote, MLflow and Ray's pyarrow filesystem in this process and in every child find it.
- `mlflow_server`: a real `mlflow server` process (SQLite backend store, artifacts proxied to
  s3://<bucket>/mlflow on that moto server).

Registered in tests/conftest.py with `pytest_plugins = ["tests.servers"]`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

BIN = Path(sys.executable).parent
BUCKET = "fastgen-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies (`proc`: the server's
    process, None when another process started it) or never does."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    said = log.read_text()[-3000:] if log.exists() else f"(no {log})"
    raise RuntimeError(f"{url} not up after {timeout:.0f}s:\n{said}")


def prefect_env(project: Path, api: str) -> dict:
    """The environment of a throwaway project copy's Prefect server, deploys and workers: its own
    PREFECT_HOME, the API at `api`, the copy's code first on the path, analytics and UI off, and
    its own TMPDIR (a process worker's per-run temporary folders, which a killed worker leaves
    behind, stay inside the copy, not in /tmp)."""
    (project / ".tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1",
           "PREFECT_HOME": str(project / ".prefect"), "PREFECT_API_URL": api, "TMPDIR": str(project / ".tmp"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_UI_ENABLED": "false"}
    for k in ("FASTGEN_INVOCATION", "MLFLOW_TRACKING_URI", "PREFECT_PROFILE"):
        env.pop(k, None)
    return env


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server in its own process group (so that stopping it stops its workers too)."""
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# pytest-xdist's controller starts one Prefect API for its test processes (tests/conftest.py) and
# names it and its log to them in these variables: one server's start-up (imports, ~10 s of CPU in
# database migrations) and idle load (~2 % of a core) instead of one per process
SHARED_PREFECT_API, SHARED_PREFECT_LOG = "FASTGEN_TEST_PREFECT_API", "FASTGEN_TEST_PREFECT_LOG"


def start_prefect_api(d: Path) -> tuple[subprocess.Popen, str]:
    """A Prefect API server as Prefect's test harness starts one (uvicorn on the server app in
    ephemeral mode: no UI, the background services an ephemeral server runs), on 127.0.0.1 with its
    SQLite database and log (`prefect-api.log`) in `d`; returns (process, API url), not waiting for it."""
    import prefect

    port = free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(d / ".prefect"),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{d / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    proc = start([sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                  "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                  "--log-level", "error", "--lifespan", "on"], d / "prefect-api.log", env)
    return proc, f"http://127.0.0.1:{port}/api"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server on 127.0.0.1, bucket `fastgen-test`, AWS variables set for the session."""
    d = tmp_path_factory.mktemp("moto")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], d / "moto.log")
    env = {"AWS_ACCESS_KEY_ID": "fastgen-test-key", "AWS_SECRET_ACCESS_KEY": "fastgen-test-secret-d41d8cd9",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           # no ~/.aws files of whoever runs the tests
           "AWS_CONFIG_FILE": str(d / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(d / "none")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            wait_http(f"{endpoint}/", proc, d / "moto.log", timeout=120)
            import s3fs

            s3fs.S3FileSystem().mkdir(BUCKET)
            yield SimpleNamespace(endpoint=endpoint, bucket=BUCKET, env=env, url=f"s3://{BUCKET}",
                                  log=d / "moto.log")
        finally:
            stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory, mlflow_template):
    """`mlflow server` on 127.0.0.1: SQLite backend (a copy of the migrated empty store), artifacts
    proxied to s3://fastgen-test/mlflow. Its url is the tracking URI."""
    d = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template, d / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    proc = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                  "--artifacts-destination", f"{s3_server.url}/mlflow", "--serve-artifacts",
                  "--workers", "1"], d / "server.log", env)
    try:
        wait_http(f"{url}/health", proc, d / "server.log", timeout=240)
        yield SimpleNamespace(url=url, artifacts=f"{s3_server.url}/mlflow", log=d / "server.log")
    finally:
        stop(proc)
