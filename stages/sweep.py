"""Recipe overrides and sweep grids, with the grammar of `dvc exp run -S` (Hydra's override
grammar, which DVC uses): `stages.cd.method.N=8`, `+key=value` (add), `~key` (delete), and for
sweeps `key=v1,v2`, `key=range(1,4)`, `key=choice(a,b)`.

An override is applied to the recipe's YAML mapping before validation, so an overridden recipe is
validated like a file: one line per problem naming the file and the field path. Nothing here runs
a stage or imports an orchestration library; `flows/pipeline.py` (one run), `flows/sweep.py` and
`fastgen sweep` (grids) build on it.

    trials(grid)          the cartesian product of a grid, in key order, as override dicts
    sweep_id(recipe, grid) a stable name for one sweep (rerunning the same sweep resumes it)
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

from .recipe import Recipe, RecipeError, parse_recipe, read_yaml

PROJECT = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 30  # a sweep's trials send Prefect's flow-run heartbeat this often (Prefect's minimum)
LOST_AFTER_S = 3 * HEARTBEAT_S  # a trial run silent this long is lost (flows/sweep.py)


def recipe_names() -> list[str]:
    """The recipes shipped in params/ (file stems)."""
    return sorted(p.stem for p in (PROJECT / "params").glob("*.yaml"))


def recipe_file(recipe: str) -> str:
    """The file of a recipe given by name (`toy_cd`) or path; a shipped one is named relative to the
    project (`params/toy_cd.yaml`, as dvc.yaml names it)."""
    if recipe in recipe_names():
        return f"params/{recipe}.yaml" if Path.cwd().resolve() == PROJECT else str(PROJECT / "params" / f"{recipe}.yaml")
    return recipe


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parse(text: str, where: str):
    from hydra.errors import HydraException

    try:
        return _parser().parse_override(text)
    except HydraException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError([f"{where}: {text!r}: not KEY=VALUE in the grammar of `dvc exp run -S` ({first})"]) from None


def _value(o) -> Any:
    return None if o.is_delete() else o.value()


def _key(o) -> str:
    return ("+" if o.is_add() else "~" if o.is_delete() else "") + o.key_or_group


def parse_sets(texts: list[str], where: str = "-S") -> dict[str, Any]:
    """`-S KEY=VALUE` strings as one override dict (a sweep value is refused: use `fastgen sweep`)."""
    out = {}
    for t in texts:
        o = _parse(t, where)
        if o.is_sweep_override():
            raise RecipeError([f"{where}: {t!r}: a sweep (several values) in a single run: use `fastgen sweep`"])
        out[_key(o)] = _value(o)
    return out


def parse_grid(texts: list[str], where: str = "-S") -> dict[str, list]:
    """`-S KEY=V1,V2` strings as a grid: key -> its values (a single value is a one-value axis)."""
    out: dict[str, list] = {}
    for t in texts:
        o = _parse(t, where)
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise RecipeError([f"{where}: {t!r}: an interval has no finite list of values: use a list or range()"])
            out[_key(o)] = list(o.sweep_iterator())
        else:
            out[_key(o)] = [_value(o)]
    return out


def _coerce(v: Any) -> Any:
    """A value given as text (a UI form, a JSON file) read with the `-S` grammar, as DVC would."""
    if isinstance(v, str):
        try:
            o = _parse(f"k={v}", "overrides")
        except RecipeError:  # not a value of the grammar (a path with '=' in it): the text itself
            return v
        return v if o.is_sweep_override() else o.value()
    return v


def apply_overrides(raw: dict, overrides: dict[str, Any], path: str) -> dict:
    """A copy of the recipe mapping `raw` with `overrides` (dotted key -> value; `+key` adds, `~key`
    deletes) applied; missing intermediate mappings are created (the schema then judges them)."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        delete = key.startswith("~")
        parts = key.lstrip("+~").split(".")
        if not all(parts):
            raise RecipeError([f"{path}: overrides: {key!r}: not a dotted key"])
        node = out
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise RecipeError([f"{path}: {'.'.join(parts[:i + 1])}: no item {p} in a list of {len(node)}"])
                p = int(p)
            elif not isinstance(node, dict):
                raise RecipeError([f"{path}: {'.'.join(parts[:i])}: a {type(node).__name__}, not a mapping: "
                                   f"cannot set {key!r}"])
            if last:
                if delete:
                    if isinstance(node, dict):
                        node.pop(p, None)
                    else:
                        node.pop(p)
                else:
                    node[p] = _coerce(value)
            else:
                if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
                    node[p] = {}
                node = node[p]
    return out


def load_with_overrides(recipe: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe (name in params/ or path), apply `overrides`, validate; RecipeError lists the
    problems, each naming the file (and the overrides when there are any) and the field path."""
    path = recipe_file(recipe)
    raw = read_yaml(path)
    if not overrides:
        return parse_recipe(raw, path)
    if not isinstance(raw, dict):
        return parse_recipe(raw, path)  # its own one-line problem
    r = parse_recipe(apply_overrides(raw, overrides, path), f"{path} (with -S overrides)")
    return r.at(path)


MAX_TRIALS = 1000  # a larger grid is refused unless asked for (`--max-trials`, the flow's `max_trials`)


def check_size(grid: dict[str, list], max_trials: int = MAX_TRIALS) -> int:
    """The number of trials of `grid`; RecipeError (one line) above `max_trials`, so that a typo
    such as `range(1,10000)` does not submit thousands of deployment runs."""
    n = math.prod(len(v) for v in grid.values())
    if n > max_trials:
        sizes = " x ".join(f"{len(v)} ({k})" for k, v in grid.items())
        raise RecipeError([f"fastgen sweep: the grid has {n} trials ({sizes}), more than the limit of {max_trials}: "
                           "narrow it, or raise the limit (--max-trials; the sweep flow's max_trials)"])
    return n


def trials(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The trials of a grid: every combination, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def trial_name(overrides: dict[str, Any]) -> str:
    """A folder and run name for one trial: stable across reruns, readable in the UI."""
    short = "_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9_.+-]", "", f"{digest_of(overrides)[:8]}-{short}")[:80]


def sweep_id(recipe: Recipe, grid: dict[str, list]) -> str:
    """One sweep: the recipe's full digest and the grid. The same sweep run again has the same id
    (and so resumes); a changed recipe or grid is a new sweep."""
    return f"{recipe.name}-{digest_of([recipe.digest(), grid])[:10]}"


def trial_overrides(base: dict[str, Any], sweep_root: str, trial: dict[str, Any]) -> dict[str, Any]:
    """A trial's overrides: the grid values, plus its own storage root under the sweep's."""
    return {**base, **trial, "storage.root": f"{sweep_root}/{trial_name(trial)}"}


def validate_trials(recipe: str, grid: dict[str, list], extra: dict[str, Any] | None = None,
                    given: list[dict[str, Any]] | None = None) -> list[Recipe]:
    """Every trial of the grid (or the `given` override dicts) validated before any runs;
    RecipeError with every problem of every bad trial (each line says which trial)."""
    probs, out = [], []
    for t in trials(grid) if given is None else given:
        try:
            out.append(load_with_overrides(recipe, {**(extra or {}), **t}))
        except RecipeError as e:
            probs += [f"trial {json.dumps(t)}: {p}" for p in e.problems]
    if probs:
        raise RecipeError(probs)
    return out


def cli_args(argv: list[str] | None = None) -> tuple[str, dict, int, float, int] | int:
    """`fastgen sweep RECIPE -S KEY=V1,V2 [-S ...] [--max-parallel N] [--max-trials N] [--lost-after S]`:
    (recipe, grid, max parallel, lost after, max trials) with every trial validated, or an exit status (2) after printing
    the problems — before Prefect is imported or contacted."""
    import argparse
    import os
    import sys

    ap = argparse.ArgumentParser(prog="fastgen sweep", description="Run a recipe over a grid of overrides: one "
                                 "deployment run per trial on the work pool (flows/sweep.py, infra/README.md).")
    ap.add_argument("recipe", help="a recipe name in params/ (its deployment fastgen/<name> runs the trials)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=V1,V2",
                    help="a grid axis (the grammar of `dvc exp run -S`: a,b / range(1,4) / choice(a,b)); repeatable")
    ap.add_argument("--max-parallel", type=int, default=4, help="trials in flight at once (default 4)")
    ap.add_argument("--max-trials", type=int, default=MAX_TRIALS,
                    help=f"refuse a grid of more trials than this (default {MAX_TRIALS})")
    ap.add_argument("--lost-after", type=float, default=LOST_AFTER_S, metavar="SECONDS",
                    help=f"a trial run silent this long (no heartbeat or other event; trials send a heartbeat every "
                    f"{HEARTBEAT_S} s) is taken as lost with its worker: set Crashed and submitted again "
                    f"(default {LOST_AFTER_S})")
    a = ap.parse_args(argv)
    if a.recipe not in recipe_names():
        print(f"fastgen sweep: {a.recipe!r} is not a recipe in params/ (a sweep runs the deployment fastgen/<name>)",
              file=sys.stderr)
        return 2
    if a.max_parallel < 1:
        print(f"fastgen sweep: --max-parallel {a.max_parallel}: at least 1 trial must be in flight", file=sys.stderr)
        return 2
    if not a.lost_after > HEARTBEAT_S:
        print(f"fastgen sweep: --lost-after {a.lost_after:g}: must exceed the trials' heartbeat period "
              f"({HEARTBEAT_S} s), or live trials would be taken as lost", file=sys.stderr)
        return 2
    try:
        grid = parse_grid(a.set)
        if not grid:
            raise RecipeError(["fastgen sweep: no grid: give at least one -S KEY=V1,V2"])
        check_size(grid, a.max_trials)
        validate_trials(a.recipe, grid)
    except RecipeError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        print("fastgen sweep: trials run as deployment runs on the work pool: set PREFECT_API_URL to the Prefect "
              "server that holds the deployments (infra/README.md)", file=sys.stderr)
        return 2
    return a.recipe, grid, a.max_parallel, a.lost_after, a.max_trials
