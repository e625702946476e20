"""`fastgen` command line.

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
"""
from __future__ import annotations

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "validate":
        if not rest:
            print(f"fastgen validate: name the recipe files\n{USAGE}", file=sys.stderr)
            return 2
        return 2 if validate(rest, verbose=True) else 0
    if cmd in ("stage", "flow"):
        # a bad recipe stops here, before MLflow or Prefect is imported (Prefect makes its home
        # folder on import)
        recipe = next((a for a in rest if not a.startswith("-")), None)
        if recipe is not None and validate([recipe], verbose=False):
            return 2
        if cmd == "stage":
            from .runtime import main as stage_main

            return stage_main(rest)
        from flows.pipeline import main as flow_main

        return flow_main(rest)
    if cmd == "dvcgen":
        from .dvcgen import main as gen_main

        return gen_main(rest)
    if cmd in ("lineage", "verify"):
        from . import lineage

        return (lineage.main_lineage if cmd == "lineage" else lineage.main_verify)(rest)
    if cmd == "edit":
        from .edit import cli as edit_cli

        return edit_cli(rest)
    print(f"fastgen: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
