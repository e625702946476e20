"""Run one stage of a recipe: `python -m stages.run RECIPE.yaml STAGE [--force] [--summary FILE]`
(what `dvc repro` runs for each stage; the same as `fastgen stage`). Exit status 2 with one line
per problem for a bad recipe or a stage that cannot run. `--summary FILE` (dvc.yaml's evaluate
stages): then write the evaluation's flat summary, DVC's metrics file (stages/report.py)."""
from __future__ import annotations

import sys

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


if __name__ == "__main__":
    sys.exit(run())
