"""The recipe DAG as a Prefect flow. Each recipe stage is one task calling
`stages.runtime.run_stage` — the function `dvc repro` runs through the stage CLIs — so both give the
same outputs, manifests and MLflow runs. Stages run one at a time in the recipe's order, as
`dvc repro` runs them: task threads share torch's process-wide random generator (network
initialisation draws from it), so concurrent stages in one process would make results depend on
scheduling. A stage whose output is up to date (same params digest and input digests) is skipped,
as DVC would. A stage that cannot run ends its task Failed with the stage's one-line reason (no
traceback), the stages after it are not started, and the flow run ends Failed with that reason.

Prefect's ephemeral API is used unless PREFECT_API_URL points at a server.

    python -m flows.pipeline params/toy_cd.yaml            # run a recipe
    python -m flows.pipeline params/toy_cd.yaml --force    # rerun every stage
"""
from __future__ import annotations

import argparse
import os
import sys
import uuid

from prefect import flow, task
from prefect.exceptions import FailedRun
from prefect.states import Failed

from stages import tracking
from stages.recipe import Recipe, RecipeError, load_recipe
from stages.runtime import StageError, run_stage


@task(name="stage", task_run_name="{stage}")
def stage_task(recipe: Recipe, stage: str, force: bool = False, invocation: str | None = None):
    """Run one stage under the flow run's MLflow invocation; a StageError ends the task Failed with
    its one line."""
    try:
        with tracking.invocation_scope(invocation or tracking.invocation_id()):
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
    # one MLflow parent run for this flow run
    invocation = os.environ.get("FASTGEN_INVOCATION") or f"prefect-{uuid.uuid4().hex[:12]}"
    futures: dict = {}
    for name in recipe.order():  # upstream edges for the UI's graph; one at a time (see docstring)
        f = stage_task.with_options(name=f"{recipe.name}-{name}").submit(
            recipe, name, force, invocation, wait_for=[futures[u] for u in recipe.upstream(name)])
        f.wait()
        if f.state.is_failed():
            return Failed(message=f.state.message)
        futures[name] = f
    return {name: f.result() for name, f in futures.items()}


def run_recipe(path: str, force: bool = False) -> dict[str, dict]:
    """Validate the recipe file, then run its flow."""
    return pipeline(load_recipe(path), recipe_path=path, force=force)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    try:
        recipe = load_recipe(a.recipe)
        results = pipeline(recipe, recipe_path=a.recipe, force=a.force)
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
