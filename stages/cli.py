"""`fastgen` command line.

    fastgen run RECIPE [-S KEY=VALUE ...] [--force]
                                        run a recipe here, stage after stage, then print its report
                                        (RECIPE: a name in params/, e.g. toy_cd, or a file)
    fastgen report RECIPE|SWEEP_FOLDER  the evaluation as a table (model x NFE, metric ± std, floor,
                                        ratio to the teacher, samples/s); markdown next to it
    fastgen sweep RECIPE -S KEY=V1,V2 [-S ...] [--max-parallel N]
                                        one deployment run per trial on the work pool (PREFECT_API_URL)
    fastgen validate params/*.yaml     check recipes (one line per problem; exit 2 on any)
    fastgen stage RECIPE STAGE          run one stage (same as python -m stages.run)
    fastgen flow RECIPE                 run a recipe as a Prefect flow
    fastgen dvcgen [--check]            (re)generate dvc.yaml from params/
    fastgen lineage TARGET [--json] [--source auto|manifests|mlflow] [--tracking-uri URI]
                                        provenance tree of an artifact folder / s3:// URI, MLflow
                                        run id or registered model (models:/NAME@ALIAS)
    fastgen verify ARTIFACT|RECIPE      recompute digests; exit 1 on any mismatch
    fastgen edit --model DIR --task inpaint|superres|colorize (--images F.npz | --from-test N) --out OUT.npz
                                        zero-shot editing with a consistency-type model (see --help)
    fastgen shapes ROOT [--n-per-class N] [--size S] [--seed K]
                                        write the synthetic image folder of params/shapes_cd.yaml
                                        (16x16 coloured shapes, 4 classes, PNG; fastgen_core/shapes.py)
"""
from __future__ import annotations

import os
import sys

USAGE = __doc__


def validate(paths: list[str], verbose: bool) -> int:
    """Validate recipe files; print one line per problem (and, if verbose, one per good recipe).
    Recipes that share a name and storage root would write the same outputs and DVC stages: each
    is reported. Returns the number of bad files."""
    from stages.recipe import RecipeError, load_recipe

    bad, where = set(), {}
    for p in paths:
        try:
            r = load_recipe(p)
        except RecipeError as e:
            print("\n".join(e.problems), file=sys.stderr)
            bad.add(p)
            continue
        other = where.setdefault((r.name, r.storage.root), p)
        if other != p:
            print(f"{p}: name: recipe {r.name!r} is also the name of {other} with the same storage.root: both "
                  f"would write {r.storage.root}/{r.name}/ and the same DVC stages", file=sys.stderr)
            bad.add(p)
        elif verbose:
            print(f"{p}: ok ({len(r.stages)} stages: {' -> '.join(r.order())})")
    return len(bad)


def run(argv: list[str]) -> int:
    """`fastgen run`: every stage in order in this process (what `dvc repro` runs, without DVC or
    a Prefect server; an up-to-date stage is skipped), under one MLflow parent run; then the report."""
    import argparse

    from .recipe import RecipeError
    from .sweep import load_with_overrides, parse_sets

    ap = argparse.ArgumentParser(prog="fastgen run", description=run.__doc__)
    ap.add_argument("recipe", help="a recipe name in params/ (toy_cd) or a recipe file")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value (the grammar of `dvc exp run -S`); repeatable")
    ap.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    a = ap.parse_args(argv)
    try:
        overrides = parse_sets(a.set)
        recipe = load_with_overrides(a.recipe, overrides)
    except RecipeError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    from . import report
    from .runtime import StageError, run_stage

    for stage in recipe.order():
        try:
            run_stage(recipe, stage, force=a.force)
        except StageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for stage in report.eval_stages(recipe):
        r = report.render(recipe, stage)
        where = report.write_markdown(recipe, stage, r["markdown"], r["html"])
        print(f"\n{r['text']}\n\n(markdown: {where}; with the plots: {report.html_path(recipe, stage)})")
    return 0


def shapes(argv: list[str]) -> int:
    """`fastgen shapes`: write the synthetic shapes image folder (fastgen_core/shapes.py)."""
    import argparse

    from fastgen_core.shapes import write_shapes_folder

    ap = argparse.ArgumentParser(prog="fastgen shapes", description=shapes.__doc__)
    ap.add_argument("root", help="folder to create, e.g. data/shapes16 (written atomically; an existing one "
                    "must hold the same settings' output)")
    ap.add_argument("--n-per-class", type=int, default=200, help="images per class (4 classes; default 200)")
    ap.add_argument("--size", type=int, default=16, help="image side in pixels (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="seed (the folder is a pure function of the settings)")
    a = ap.parse_args(argv)
    try:
        root = write_shapes_folder(a.root, n_per_class=a.n_per_class, size=a.size, seed=a.seed)
    except (OSError, ValueError) as e:  # FileExistsError, a folder that cannot be made, bad settings
        print(f"fastgen shapes: {e}", file=sys.stderr)
        return 2
    print(f"{root}: {4 * a.n_per_class} images ({a.size}x{a.size} RGB, 4 classes)")
    return 0


def _first_positional(args: list[str]) -> int | None:
    """The index of the first argument that is not an option or an option's value (-S KEY=VALUE)."""
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a in ("-S", "--set"):
            skip = True
        elif not a.startswith("-"):
            return i
    return None


def main(argv: list[str] | None = None) -> int:
    """Dispatch; a stage's error (`StageError`) is one line and exit 2, an unexpected error one line
    and exit 1 (`FASTGEN_TRACEBACK=1` for Python's traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except Exception as e:  # one line, as for a bad recipe; KeyboardInterrupt and SystemExit pass
        if os.environ.get("FASTGEN_TRACEBACK"):
            raise
        from .tracking import scrub

        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        spec = sys.modules.get("stages.spec")  # imported if a stage's error was raised
        if spec is not None and isinstance(e, spec.StageError):  # expected: said as it is
            print(f"fastgen {argv[0]}: {scrub(first)}", file=sys.stderr)
            return 2
        what = f"{type(e).__name__}: {scrub(first)}" if first else type(e).__name__
        print(f"fastgen {argv[0]}: {what} (FASTGEN_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "validate":
        if rest in (["-h"], ["--help"]):
            print("usage: fastgen validate RECIPE.yaml [...]\n\nCheck recipe files: one line per problem "
                  "(file, field path, what is wrong) and exit 2 on any; one line per good recipe with its stages.")
            return 0
        if not rest:
            print(f"fastgen validate: name the recipe files\n{USAGE}", file=sys.stderr)
            return 2
        return 2 if validate(rest, verbose=True) else 0
    if cmd in ("stage", "flow"):
        from .sweep import recipe_file

        # a bad recipe stops here, before MLflow or Prefect is imported (Prefect makes its home
        # folder on import); a recipe name (toy_cd) is passed on as its file
        i = _first_positional(rest)
        if i is not None:
            rest = [*rest[:i], recipe_file(rest[i]), *rest[i + 1:]]
            if validate([rest[i]], verbose=False):
                return 2
        if cmd == "stage":
            from .runtime import main as stage_main

            return stage_main(rest, prog="fastgen stage")
        from flows.pipeline import main as flow_main

        return flow_main(rest, prog="fastgen flow")
    if cmd == "run":
        return run(rest)
    if cmd == "report":
        from .report import main as report_main

        return report_main(rest)
    if cmd == "sweep":
        from .sweep import cli_args

        parsed = cli_args(rest)  # every trial validated before Prefect is imported
        if isinstance(parsed, int):
            return parsed
        from flows.sweep import run_cli

        return run_cli(*parsed)
    if cmd == "dvcgen":
        from .dvcgen import main as gen_main

        return gen_main(rest, prog="fastgen dvcgen")
    if cmd in ("lineage", "verify"):
        from . import lineage

        return (lineage.main_lineage if cmd == "lineage" else lineage.main_verify)(rest)
    if cmd == "edit":
        from .edit import cli as edit_cli

        return edit_cli(rest)
    if cmd == "shapes":
        return shapes(rest)
    print(f"fastgen: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
