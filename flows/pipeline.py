"""The recipe DAG as a Prefect flow. Each recipe stage is one task calling
`stages.runtime.run_stage` — the function `dvc repro` runs through the stage CLIs — so both give the
same outputs, manifests and MLflow runs. Stages run one at a time in the recipe's order, as
`dvc repro` runs them: task threads share torch's process-wide random generator (network
initialisation draws from it), so concurrent stages in one process would make results depend on
scheduling. A stage whose output is up to date (same params digest and input digests) is skipped,
as DVC would. A stage that cannot run ends its task Failed with the stage's one-line reason (no
traceback), the stages after it are not started, and the flow run ends Failed with that reason.

Prefect's ephemeral API is used unless PREFECT_API_URL points at a server.

Two flows share that body:
- `run_recipe` (flow `fastgen`), what deployments run (prefect.yaml, one per recipe in params/):
  three plain parameters that render as a small UI form — `recipe` (a choice of params/),
  `overrides` (dotted keys -> values, the grammar of `dvc exp run -S`, validated with the recipe
  before anything runs) and `force`;
- `pipeline` (flow `fastgen-recipe`), for callers holding a validated `Recipe`.

    python -m flows.pipeline params/toy_cd.yaml            # run a recipe
    python -m flows.pipeline params/toy_cd.yaml --force    # rerun every stage
    python -m flows.pipeline toy_cd -S stages.cd.method.N=8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from typing import Any, Literal

# Prefect's server telemetry (on by default) writes to the ephemeral API's SQLite database while the
# first flow run does, and prints a "database is locked" traceback although nothing failed; a busy
# machine needs more than the default 20 s to start that API. Both before Prefect reads its settings.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, task  # noqa: E402
from prefect.exceptions import FailedRun  # noqa: E402
from prefect.states import Failed  # noqa: E402

from stages import tracking  # noqa: E402
from stages.recipe import Recipe, RecipeError  # noqa: E402
from stages.runtime import StageError, run_stage  # noqa: E402
from stages.sweep import load_with_overrides, parse_sets, recipe_names  # noqa: E402


@task(name="stage", task_run_name="{stage}")
def stage_task(recipe: Recipe, stage: str, force: bool = False, invocation: str | None = None,
               pipeline_tags: dict | None = None):
    """Run one stage under the flow run's MLflow invocation; a StageError ends the task Failed with
    its one line."""
    try:
        with tracking.invocation_scope(invocation or tracking.invocation_id(), pipeline_tags):
            m = run_stage(recipe, stage, force=force)
    except StageError as e:
        return Failed(message=f"stage {stage!r}: {e}")
    return {"stage": stage, "digest": m["digest"], "metrics": m.get("metrics", {})}


@flow(name="fastgen-recipe", flow_run_name="{recipe.name}")
def pipeline(recipe: Recipe, recipe_path: str | None = None, force: bool = False) -> dict[str, dict]:
    """Run every stage of `recipe` in dependency order; returns stage -> {digest, metrics}.
    `recipe_path` restores the recipe's file path where the recipe arrives without it (a
    deployment's JSON parameters); by default the recipe keeps its own."""
    if recipe_path is not None:
        recipe.at(recipe_path)
    return _run_stages(recipe, force)


def _run_stages(recipe: Recipe, force: bool, pipeline_tags: dict | None = None):
    """The flow body: every stage as a task, in order, under one MLflow parent run."""
    invocation = os.environ.get("FASTGEN_INVOCATION") or f"prefect-{uuid.uuid4().hex[:12]}"
    futures: dict = {}
    for name in recipe.order():  # upstream edges for the UI's graph; one at a time (see docstring)
        f = stage_task.with_options(name=f"{recipe.name}-{name}").submit(
            recipe, name, force, invocation, pipeline_tags, wait_for=[futures[u] for u in recipe.upstream(name)])
        f.wait()
        if f.state.is_failed():
            return Failed(message=f.state.message)
        futures[name] = f
    return {name: f.result() for name, f in futures.items()}


# the recipes shipped in params/, as the choice a deployment's form offers
_NAMES = recipe_names()
RecipeName = Literal[tuple(_NAMES)] if _NAMES else str  # type: ignore[valid-type]

# set by a sweep on each trial's flow run (job variables): the sweep's MLflow run and its id
SWEEP_RUN_ENV, SWEEP_ENV = "FASTGEN_SWEEP_RUN", "FASTGEN_SWEEP"


@flow(name="fastgen", flow_run_name="{recipe}", validate_parameters=True)
def run_recipe(recipe: RecipeName, overrides: dict[str, Any] = {}, force: bool = False):  # noqa: B006 (read only; {} opens the UI form as a JSON editor, None as a type toggle)
    """Run recipe `params/<recipe>.yaml` with `overrides` applied (dotted keys as in
    `dvc exp run -S`, e.g. {"stages.cd.method.N": 8}); the overridden recipe is validated before
    any stage runs. `force` reruns stages that are up to date."""
    try:
        r = load_with_overrides(recipe, overrides or {})
    except RecipeError as e:
        return Failed(message="; ".join(e.problems))
    tags = {}
    if overrides:
        tags["fastgen.overrides"] = json.dumps(overrides, sort_keys=True)
    if os.environ.get(SWEEP_RUN_ENV):  # a sweep trial: nested under the sweep's MLflow run
        tags.update({"mlflow.parentRunId": os.environ[SWEEP_RUN_ENV], "fastgen.sweep": os.environ.get(SWEEP_ENV, "")})
    return _run_stages(r, force, tags)


def main(argv=None, prog: str = "python -m flows.pipeline") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe file, or the name of one in params/")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value (the grammar of `dvc exp run -S`); repeatable")
    a = ap.parse_args(argv)
    try:
        overrides = parse_sets(a.set)
        recipe = load_with_overrides(a.recipe, overrides)  # validated before Prefect starts anything
        results = pipeline(recipe, recipe_path=recipe.path, force=a.force)
    except RecipeError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    except FailedRun as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in results.items():
        print(f"{name}: {r['digest'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
