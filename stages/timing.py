"""Phase timings of a stage run.

`runtime.run_stage` measures its phases (seconds, time.perf_counter) and prints them as one line
`[fastgen-timing] {json}` on stderr when it returns; bench/pipeline.py parses it. Code running inside
a stage adds its own phases with `phase(name)` / `add_phase`; `runtime` reports those as
`run/<name>`, parts of the stage's `run` phase.
"""
from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager

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
