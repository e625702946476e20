"""Phase timings of a stage run.

`runtime.run_stage` measures its phases (seconds, time.perf_counter) and prints them as one line
`[fastgen-timing] {json}` on stderr when it returns; bench/pipeline.py parses it. Code running inside
a stage adds its own phases with `phase(name)` / `add_phase`; `runtime` reports those as
`run/<name>`, parts of the stage's `run` phase.

Pause points, for the fault tests only: `pause_point(name)` does nothing unless
`$FASTGEN_PAUSE_AT` names it (comma-separated). Then the process writes its pid into
`$FASTGEN_PAUSE_FILE` and waits while that file exists (at most `$FASTGEN_PAUSE_S` seconds, 120 by
default), so that a test can kill it at a known moment (`train`: training with a checkpoint written;
`upload`: an S3 upload with some files sent, the manifest not; `mlflow`: the outputs published, the
lineage half logged) or let it go on by deleting the file. Each point pauses once per process.
"""
from __future__ import annotations

import contextvars
import os
import time
from contextlib import contextmanager
from pathlib import Path

TIMING_PREFIX = "[fastgen-timing]"
_timings: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastgen_timings", default=None)


def current() -> dict | None:
    """The phase record of the stage running in this context (None outside one)."""
    return _timings.get()


@contextmanager
def recording(phases: dict | None = None):
    """Record the phases of the block into `phases` (a fresh dict by default); yields it."""
    phases = {} if phases is None else phases
    token = _timings.set(phases)
    try:
        yield phases
    finally:
        _timings.reset(token)


def add_phase(name: str, seconds: float) -> None:
    """Add `seconds` to phase `name` of the stage running in this context (no-op outside one)."""
    t = _timings.get()
    if t is not None:
        t[name] = t.get(name, 0.0) + seconds


@contextmanager
def phase(name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add_phase(name, time.perf_counter() - t0)


@contextmanager
def sub_phases(prefix: str):
    """Phases recorded inside the block are stored as `<prefix>/<name>` (nested in `prefix`)."""
    outer = _timings.get()
    with recording() as inner:
        yield
    if outer is not None:
        for k, v in inner.items():
            outer[f"{prefix}/{k}"] = outer.get(f"{prefix}/{k}", 0.0) + v


_paused: set[str] = set()


def pause_point(name: str) -> None:
    """Pause here, the first time this process reaches the point, if `$FASTGEN_PAUSE_AT` names it
    (see the module docstring)."""
    if name in _paused or name not in os.environ.get("FASTGEN_PAUSE_AT", "").split(","):
        return
    _paused.add(name)
    flag = Path(os.environ["FASTGEN_PAUSE_FILE"])
    part = flag.with_name(f".{flag.name}.{os.getpid()}")
    part.write_text(f"{os.getpid()} {name}\n")
    os.replace(part, flag)
    t_end = time.monotonic() + float(os.environ.get("FASTGEN_PAUSE_S", "120"))
    while flag.exists() and time.monotonic() < t_end:
        time.sleep(0.05)
