"""Run one stage of a recipe: `python -m stages.run RECIPE.yaml STAGE [--force] [--summary FILE]`
(what `dvc repro` runs for each stage; `fastgen stage` runs the same stage, without `--summary`). Exit status 2 with one line
per problem for a bad recipe or a stage that cannot run. `--summary FILE` (dvc.yaml's evaluate
stages): then write the evaluation's flat summary, DVC's metrics file (stages/report.py)."""
from __future__ import annotations

import atexit
import os
import sys
import threading

from .runtime import main


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    summary = None
    if "--summary" in argv[:-1]:
        i = argv.index("--summary")
        summary = argv[i + 1]
        del argv[i:i + 2]
    rc = main(argv)
    if rc == 0 and summary:
        from .report import write_summary

        write_summary(argv[0], argv[1], summary)
    return rc


def exit_now(rc: int) -> None:
    """End the stage process as a normal exit would, less the interpreter's module-by-module
    teardown (~1 s of CPU for torch's modules, on every stage `dvc repro` runs): run the atexit
    handlers (MLflow's, logging's), flush, `os._exit`. With a non-daemon thread still alive, the
    normal exit (it shuts such threads down and waits for them)."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(rc)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


if __name__ == "__main__":
    exit_now(run())
