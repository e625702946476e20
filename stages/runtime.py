"""What every stage shares: resolve inputs (verified against their manifests), skip when up to
date, run into a temporary folder, write the manifest last, rename into place, track in MLflow.

`run_stage(recipe, name)` is the one entry point: the CLIs (`python -m stages.<kind>`), `dvc repro`,
the Prefect flow and the tests all call it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen_core import artifacts
from fastgen_core.recipe import Recipe, RecipeError, load_recipe

from . import tracking

PROJECT = Path(__file__).resolve().parent.parent


class StageError(Exception):
    """A stage that cannot run with what it was given (one line, shown without a traceback)."""


def stage_dir(recipe: Recipe, stage: str) -> Path:
    root = Path(recipe.storage.root)
    return (root if root.is_absolute() else Path.cwd() / root) / recipe.name / stage


@dataclass
class Input:
    stage: str
    path: Path
    manifest: dict


@dataclass
class StageContext:
    recipe: Recipe
    name: str
    out: Path                                  # temporary output folder; renamed into place on success
    inputs: dict[str, list[Input]]             # role -> inputs (one for str roles, several for lists)
    tracker: tracking.Tracker
    metrics: dict = field(default_factory=dict)

    @property
    def spec(self):
        return self.recipe.stages[self.name]

    def input(self, role: str) -> Input:
        if role not in self.inputs:
            raise StageError(f"{self.recipe.path}: stages.{self.name}.inputs.{role}: this {self.spec.kind} stage needs it")
        return self.inputs[role][0]

    @property
    def device(self) -> torch.device:
        use = self.recipe.compute.use_gpu and torch.cuda.is_available()
        return torch.device("cuda" if use else "cpu")

    def partial_dir(self) -> Path:
        """Where resumable checkpoints survive a crash: keyed by the stage's params digest."""
        d = stage_dir(self.recipe, self.name)
        return d.parent / ".partial" / f"{self.name}-{self.recipe.digest(self.name)[:16]}"


def resolve_inputs(recipe: Recipe, stage: str) -> dict[str, list[Input]]:
    """Each input artifact, checked against its manifest (refuses missing or altered ones)."""
    out: dict[str, list[Input]] = {}
    for role, names in recipe.stages[stage].inputs.items():
        for up in [names] if isinstance(names, str) else names:
            p = stage_dir(recipe, up)
            try:
                m = artifacts.verify(p)
            except artifacts.DigestMismatch as e:
                raise StageError(f"stage {stage!r} refuses input {role!r} from stage {up!r}: {e}") from None
            out.setdefault(role, []).append(Input(up, p, m))
    return out


def up_to_date(recipe: Recipe, stage: str, inputs: dict[str, list[Input]]) -> dict | None:
    """The existing manifest if the output was made from these params and inputs, else None."""
    d = stage_dir(recipe, stage)
    try:
        m = artifacts.verify(d)
    except (artifacts.DigestMismatch, FileNotFoundError, ValueError):
        return None
    want = {i.stage: i.manifest["digest"] for ins in inputs.values() for i in ins}
    have = {k: v["digest"] for k, v in m.get("inputs", {}).items()}
    return m if m.get("params_digest") == recipe.digest(stage) and want == have else None


def run_stage(recipe: Recipe | str, stage: str, force: bool = False) -> dict:
    """Run one stage of a recipe (if not up to date) and return its manifest."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if stage not in recipe.stages:
        raise StageError(f"{recipe.path}: stages: no stage named {stage!r} (have: {', '.join(recipe.stages)})")
    spec = recipe.stages[stage]
    inputs = resolve_inputs(recipe, stage)
    if not force and (m := up_to_date(recipe, stage, inputs)):
        print(f"[fastgen] {recipe.name}/{stage}: up to date", file=sys.stderr)
        return m
    kind = importlib.import_module(f"stages.{spec.kind}")
    t0 = time.time()
    params = recipe.stage_params(stage)
    code = artifacts.git_commit(PROJECT)
    tags = {"fastgen.kind": spec.kind, "fastgen.params_digest": recipe.digest(stage),
            "fastgen.dvc_stage": f"{recipe.name}-{stage}", "fastgen.git_commit": code["git_commit"],
            "fastgen.output": str(stage_dir(recipe, stage)),
            **{f"fastgen.input.{i.stage}": i.manifest["digest"] for ins in inputs.values() for i in ins},
            **{f"fastgen.upstream_run.{i.stage}": (i.manifest.get("mlflow") or {}).get("run_id")
               for ins in inputs.values() for i in ins}}
    tr = tracking.start_stage_run(recipe, stage, params, tags)
    ok = False
    try:
        with artifacts.atomic_dir(stage_dir(recipe, stage)) as tmp:
            ctx = StageContext(recipe, stage, tmp, inputs, tr)
            kind.run(ctx)
            manifest = artifacts.write_manifest(tmp, {
                "recipe": recipe.name, "recipe_path": recipe.path, "stage": stage, "kind": spec.kind,
                "params_digest": recipe.digest(stage), "params": params,
                "inputs": {i.stage: {"role": role, "digest": i.manifest["digest"], "path": str(i.path)}
                           for role, ins in inputs.items() for i in ins},
                "code": code, "metrics": ctx.metrics,
                "mlflow": {"run_id": tr.run_id, "parent_run_id": tr.parent_id} if tr.run_id else None,
                "wall_s": round(time.time() - t0, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        tr.set_tags({"fastgen.output_digest": manifest["digest"]})
        ok = True
    finally:
        tracking.end_stage_run(tr, ok)
    print(f"[fastgen] {recipe.name}/{stage}: done in {time.time() - t0:.1f}s", file=sys.stderr)
    return manifest


def main(kind: str | None = None, argv: list[str] | None = None) -> int:
    """CLI: python -m stages.<kind> RECIPE.yaml STAGE [--force]."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{kind or 'runtime'}", description=__doc__)
    ap.add_argument("recipe", help="recipe YAML file in params/")
    ap.add_argument("stage", help="stage name in the recipe")
    ap.add_argument("--force", action="store_true", help="run even if the output is up to date")
    a = ap.parse_args(argv)
    try:
        recipe = load_recipe(a.recipe)
        if a.stage not in recipe.stages:
            raise StageError(f"{a.recipe}: stages: no stage named {a.stage!r} (have: {', '.join(recipe.stages)})")
        if kind and recipe.stages[a.stage].kind != kind:
            raise StageError(f"{a.recipe}: stages.{a.stage}.kind: is {recipe.stages[a.stage].kind!r}, "
                             f"not {kind!r} (use python -m stages.{recipe.stages[a.stage].kind})")
        run_stage(recipe, a.stage, force=a.force)
    except RecipeError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    except (StageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
