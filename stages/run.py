"""Run one stage of a recipe: `python -m stages.run RECIPE.yaml STAGE [--force]` (what `dvc repro`
runs for each stage; the same as `fastgen stage`). Exit status 2 with one line per problem for a
bad recipe or a stage that cannot run."""
from __future__ import annotations

import sys

from .runtime import main

if __name__ == "__main__":
    sys.exit(main())
