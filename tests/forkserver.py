"""A warm interpreter for the stage processes of the tests' `dvc repro` runs.

Each DVC stage is a fresh `python -m stages.run …` process, and on a 2-core CPU most of its time is
imports: torch (3–4 s of CPU) and, at a training stage's first optimiser step, `torch._dynamo` (2 s
more) — about half the suite's time went there (docs/results.md, "The test suite"). Here one server
process imports those libraries once, and the `python` that `dvc repro` finds first on its PATH
(`shim()`) hands each `-m stages.run` command to it (and `-m stages.dvcgen`, which writes the test
repository's `dvc.yaml`, also a torch import): the server forks, the child takes the command's
stdin/stdout/stderr, working directory, environment and arguments, and runs the module as
`__main__`, exactly as a fresh interpreter would from there on. Only third-party modules are
preloaded: the project's own code (`fastgen_core`, `stages`) is imported in the child, from the
repository the command runs in, so a test that edits it sees the edit. Any other `python` command
goes to the real interpreter. This is a test harness, not part of fastgen: users' `dvc repro` starts
plain processes.

The preloaded objects are frozen (`gc.freeze()`) before the first fork, as the `gc` docs advise for a
process that forks without exec: a child's collector then never walks the parent's
library objects (~330 000 after these imports; a full collection of them takes ~0.2 s of CPU, and in a
profile of `toy_dmd`'s repro each stage child ran one).

The exit status is the child's own (a second fork: the first child waits for the stage and reports
its status, so a stage that ends with `os._exit` or a signal reports it as such).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

PRELOAD = ("torch", "torch._dynamo", "numpy", "pydantic", "yaml", "tqdm", "safetensors.torch")
ENV = "FASTGEN_TEST_FORKSERVER"
ROUTED = ("stages.run", "stages.dvcgen")  # the `python -m` commands the server runs


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("forkserver: connection closed")
        buf += chunk
    return buf


def _run_module(req: dict, fds: list[int]) -> None:
    """In the grandchild: become `python -m <module> <args>` started in req's cwd with req's env."""
    import importlib
    import runpy

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin, sys.stdout, sys.stderr = (open(0, closefd=False), open(1, "w", closefd=False),
                                         open(2, "w", closefd=False))
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    tempfile.tempdir = None
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [req["cwd"], *extra, *BASE_PATH]
    importlib.invalidate_caches()
    sys.argv = ["-m", *req["args"]]  # runpy puts the module's path first, as `python -m` does
    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)


def _handle(conn: socket.socket) -> None:
    """In the first child: fork the stage, wait for it, send its wait status back."""
    n = struct.unpack("!I", _recv_exactly(conn, 4))[0]
    msg, fds, _, _ = socket.recv_fds(conn, n, 3)
    msg += _recv_exactly(conn, n - len(msg))
    req = json.loads(msg)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        code = 1
        try:
            _run_module(req, fds)
            code = 0
        except SystemExit as e:  # as the interpreter reads it: None is 0, anything but an int is printed, 1
            code = e.code or 0
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - a fresh interpreter prints the traceback and exits 1
            import traceback

            traceback.print_exc()
        finally:
            import atexit

            atexit._run_exitfuncs()  # as an interpreter's exit would (stages.run's own exit runs them too)
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except Exception:  # noqa: BLE001
                    pass
            os._exit(code)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))


def serve(path: str) -> None:
    for name in PRELOAD:
        __import__(name)
    own = {"fastgen_core", "stages", "flows"}
    assert not own & {m.split(".")[0] for m in sys.modules}, "the forkserver must not preload the project"
    import threading

    assert threading.active_count() == 1, "the forkserver must not fork with threads running"
    import gc

    gc.freeze()  # see the module docstring
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reap the per-request children
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    srv.settimeout(2.0)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test process is gone (killed before its teardown): so are we
                return
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            srv.close()
            try:
                _handle(conn)
            finally:
                os._exit(0)
        conn.close()


def shim(args: list[str]) -> None:
    """The `python` on the tests' PATH: `-m <one of ROUTED>` to the server, anything else to the real one."""
    path = os.environ.get(ENV)
    if not (path and len(args) >= 2 and args[0] == "-m" and args[1] in ROUTED):
        os.execv(REAL, [REAL, *args])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    msg = json.dumps({"module": args[1], "args": args[2:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    conn.sendall(struct.pack("!I", len(msg)))
    socket.send_fds(conn, [msg], [0, 1, 2])
    code = struct.unpack("!i", _recv_exactly(conn, 4))[0]
    sys.exit(code if code >= 0 else 128 - code)


REAL = sys.executable
BASE_PATH = [p for p in sys.path[1:] if p]  # stdlib and site-packages, not this file's folder


def start(folder: Path) -> tuple[subprocess.Popen, Callable[[dict], dict]]:
    """Start a server in `folder` (its socket and the `python` shim live there); returns the process
    and `route(env)`: `env` with the shim first on its PATH and the socket named, so that a
    `dvc repro` run with it runs its stage commands in the server's children."""
    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / "s"
    if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
        sock = Path(tempfile.mkdtemp(prefix="fgfs-", dir="/tmp")) / "s"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(folder / "log", "w") as log:  # its own errors; its children write to their commands' streams
        proc = subprocess.Popen([REAL, str(Path(__file__).resolve()), str(sock)], env={**env, "OMP_NUM_THREADS": "1"},
                                cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"forkserver: did not start (exit {proc.wait()}): {(folder / 'log').read_text()[-2000:]}")
    exe = folder / "python"
    exe.write_text(f'#!/bin/sh\nexec "{REAL}" -S "{Path(__file__).resolve()}" --shim "$@"\n')
    exe.chmod(0o755)
    return proc, lambda env: {**env, ENV: str(sock), "PATH": f"{folder}:{env['PATH']}"}


if __name__ == "__main__":
    if sys.argv[1] == "--shim":
        shim(sys.argv[2:])
    else:
        serve(sys.argv[1])
