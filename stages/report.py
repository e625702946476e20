"""`fastgen report RECIPE`: what an evaluation found, as a table a person reads in a terminal.

One row per model and NFE: the primary metric (sliced W2 `swd` on 2D data, Fréchet distance `fd`
on images) as mean ± std over the evaluation's seeds, the floor (held-out real data against real
data, same sample count), the distance above that floor as a multiple of the teacher's (the best
EDM model at its largest NFE), and sampling speed (samples/s, measured during the evaluation).
On images also precision / recall (k-NN manifolds in the same features; floor: real vs real) and,
when it was computed, the standard Inception FID.
The same table is written as markdown next to the evaluation (`<storage>/<recipe>/<stage>.report.md`,
with the quality-vs-NFE and precision-vs-recall plots and whether Inception FID was computed), and as
one self-contained HTML page beside it (`<stage>.report.html`: the table and every plot of the
evaluation embedded, so the file can be mailed or opened anywhere).

`--summary FILE` also writes the flat summary DVC declares as the evaluation's metrics
(`metrics/<recipe>-<stage>.json`, git-tracked, so `dvc metrics show` prints one short row per
recipe and `dvc exp show` carries it): the same few keys for every recipe.

    fastgen report toy_cd                        # or params/toy_cd.yaml
    fastgen report outputs/sweeps/<sweep id>     # one row per trial of a sweep
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

from fastgen_core import artifacts

from . import storage
from .recipe import Recipe, RecipeError

PRIMARY = ("fd", "swd")  # the primary metric: the first of these an evaluation has
NAMES = {"swd": "sliced W2", "fd": "Fréchet distance"}
EXTRA = ("precision", "recall", "inception_fid")  # image metrics shown beside the primary one when present


def eval_stages(recipe: Recipe) -> list[str]:
    return [s for s in recipe.order() if recipe.stages[s].kind == "evaluate"]


def load(recipe: Recipe, stage: str) -> tuple[Path, dict, dict]:
    """(verified local folder, manifest, metrics.json) of an evaluation stage's output
    (FileNotFoundError if it has not run)."""
    path, manifest = storage.fetch(storage.location(recipe, stage))
    return Path(path), manifest, json.loads((Path(path) / "metrics.json").read_text())


def _nfes(d: dict) -> list[int]:
    return sorted(int(k[4:]) for k in d if k.startswith("nfe_") and isinstance(d[k], dict))


def primary(results: dict) -> str | None:
    for r in results.values():
        for k in _nfes(r):
            have = r[f"nfe_{k}"]
            return next((m for m in PRIMARY if m in have), next(iter(have), None))
    return None


def rows(recipe: Recipe, manifest: dict, results: dict) -> tuple[str, list[dict]]:
    """(primary metric, one row per model × NFE) of an evaluation."""
    prim = primary(results)
    speed = (manifest.get("timing") or {}).get("samples_per_s", {})
    teachers = [m for m in results if recipe.model_method(m) == "edm"]
    gaps = [results[t][f"nfe_{_nfes(results[t])[-1]}"][prim]["above_floor"] for t in teachers if _nfes(results[t])]
    ref = min(gaps) if gaps else None
    out = []
    for model, r in results.items():
        kind = "teacher" if model in teachers else "student" if recipe.model_method(model) else "guided"
        for k in _nfes(r):
            at = r[f"nfe_{k}"]
            s = at[prim]
            out.append({"model": model, "kind": kind, "nfe": k, "mean": s["mean"], "std": s["std"],
                        "floor": s["floor_mean"], "floor_std": s.get("floor_std", 0.0), "above": s["above_floor"],
                        "ratio": s["above_floor"] / ref if ref and ref > 0 else None,
                        "samples_per_s": speed.get(model, {}).get(f"nfe_{k}"),
                        **{f"{m}{part}": at[m][key] for m in EXTRA if m in at
                           for part, key in (("", "mean"), ("_floor", "floor_mean"))}})
    return prim, out


def summary(prim: str, rs: list[dict]) -> dict:
    """The flat summary: the same keys for every recipe (one short row in `dvc metrics show`)."""
    teach = [r for r in rs if r["kind"] == "teacher"]
    ref = min((max((x for x in teach if x["model"] == t["model"]), key=lambda x: x["nfe"]) for t in teach),
              key=lambda r: r["above"], default=None)
    one = [r for r in rs if r["kind"] == "student" and r["nfe"] == 1]
    best = min(one, key=lambda r: r["above"], default=None)
    out = {"metric": prim, "floor": _r(rs[0]["floor"]) if rs else None}
    if ref:
        out.update(teacher=ref["model"], teacher_nfe=ref["nfe"], teacher_above_floor=_r(ref["above"]))
    if best:
        out.update(best_1nfe=best["model"], best_1nfe_mean=_r(best["mean"]), best_1nfe_above_floor=_r(best["above"]),
                   best_1nfe_ratio=_r(best["ratio"]), best_1nfe_samples_per_s=best["samples_per_s"])
    for m in EXTRA:  # images: precision, recall (and Inception FID) of the same two rows, and their floors
        if rs and m in rs[0]:
            out[f"floor_{m}"] = _r(rs[0][f"{m}_floor"])
            out.update({f"{who}_{m}": _r(r[m]) for who, r in (("teacher", ref), ("best_1nfe", best)) if r})
    return {k: v for k, v in out.items() if v is not None}


def _r(v, digits: int = 4):
    return None if v is None else float(f"{v:.{digits}g}")


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}"


def _speed(v) -> str:
    return "–" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


COLUMNS = ("model", "NFE", "{prim} (mean ± std)", "floor", "above floor", "× teacher", "samples/s")


def cells(prim: str, rs: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = [c.format(prim=prim) for c in COLUMNS]
    body = [[r["model"], str(r["nfe"]), f"{_fmt(r['mean'])} ± {_fmt(r['std'], 2)}", _fmt(r["floor"]),
             _fmt(r["above"], 3), _fmt(r["ratio"], 3), _speed(r["samples_per_s"])] for r in rs]
    if any("precision" in r for r in rs):  # compact: "P / R" and its floor, before the speed column
        head[-1:-1] = ["P / R", "floor P / R"]
        for r, b in zip(rs, body):
            b[-1:-1] = [f"{_fmt(r.get('precision'), 2)} / {_fmt(r.get('recall'), 2)}",
                        f"{_fmt(r.get('precision_floor'), 2)} / {_fmt(r.get('recall_floor'), 2)}"]
    if any("inception_fid" in r for r in rs):
        head[-1:-1] = ["Inception FID (floor)"]
        for r, b in zip(rs, body):
            b[-1:-1] = [f"{_fmt(r.get('inception_fid'))} ({_fmt(r.get('inception_fid_floor'))})"]
    return head, body


def text_table(head: list[str], body: list[list[str]]) -> str:
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cs: "  ".join(c.ljust(n) if i == 0 else c.rjust(n) for i, (c, n) in enumerate(zip(cs, w)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * n for n in w), *map(line, body)])


def title(recipe: Recipe, stage: str, prim: str, manifest: dict) -> str:
    ev = manifest["params"]["stage"]["evaluate"]
    seeds = ev["seeds"]
    t = (f"{recipe.name} / {stage}: {prim} ({NAMES.get(prim, prim)}; lower is better), mean ± std over "
         f"{len(seeds)} seed{'s' * (len(seeds) > 1)}; floor = real vs real; × teacher = distance above the floor "
         "relative to the best teacher's at its largest NFE")
    status = (manifest.get("metrics") or {}).get("inception_fid_status")
    if status is not None:  # an image evaluation: precision / recall are in its table
        t += (f"; P / R = precision / recall (k = {ev.get('pr_k', 3)} nearest neighbours, same features; higher "
              f"is better); Inception FID: {status}")
    return t


def report(recipe: Recipe, stage: str) -> tuple[str, str, dict]:
    """(terminal text, markdown, flat summary) of one evaluation stage."""
    r = render(recipe, stage)
    return r["text"], r["markdown"], r["summary"]


def render(recipe: Recipe, stage: str) -> dict:
    """One evaluation stage as `text` (terminal), `markdown`, `html` (self-contained) and `summary`."""
    path, manifest, results = load(recipe, stage)
    prim, rs = rows(recipe, manifest, results)
    head, body = cells(prim, rs)
    t = title(recipe, stage, prim, manifest)
    md = [f"# {recipe.name} / {stage}", "", t, "",
          "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
          *("| " + " | ".join(b) + " |" for b in body)]
    if "plots/quality_vs_nfe.png" in manifest["files"]:
        md += ["", f"![{prim} vs NFE]({stage}/plots/quality_vs_nfe.png)"]
    if "plots/precision_recall.png" in manifest["files"]:
        md += ["", f"![precision vs recall]({stage}/plots/precision_recall.png)"]
    return {"text": f"{t}\n\n{text_table(head, body)}", "markdown": "\n".join(md) + "\n", "summary": summary(prim, rs),
            "html": html_page(f"{recipe.name} / {stage}", t, head, body, figures(path, manifest, prim))}


FIRST = ("plots/quality_vs_nfe.png", "plots/precision_recall.png")  # then the evaluation's other plots


def figures(path: Path, manifest: dict, prim: str) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) of every plot of an evaluation output, the quality-vs-NFE one first."""
    names = sorted((f for f in manifest["files"] if f.startswith("plots/") and f.endswith(".png")),
                   key=lambda f: (FIRST.index(f) if f in FIRST else len(FIRST), f))
    captions = {FIRST[0]: f"{prim} vs NFE", FIRST[1]: "precision vs recall"}
    return [(captions.get(f, Path(f).stem.replace("_", " ")), (path / f).read_bytes()) for f in names]


CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}"
       "table{border-collapse:collapse;font-variant-numeric:tabular-nums}"
       "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th:first-child,td:first-child{text-align:left}"
       "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555}")


def html_page(heading: str, subtitle: str, head: list[str], body: list[list[str]],
              figs: list[tuple[str, bytes]]) -> str:
    """A self-contained HTML page: the table, then every figure embedded as a data: URI."""
    e = html.escape
    rows_ = "\n".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in b) + "</tr>" for b in body)
    figs_ = "\n".join(f'<figure><img alt="{e(cap)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                      f"<figcaption>{e(cap)}</figcaption></figure>" for cap, png in figs)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(heading)}</title>'
            f"<style>{CSS}</style></head>\n<body><h1>{e(heading)}</h1>\n<p>{e(subtitle)}</p>\n<table>\n<thead><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in head) + f"</tr></thead>\n<tbody>\n{rows_}\n</tbody></table>\n"
            f"{figs_}\n</body></html>\n")


def write_summary(recipe_path: str, stage: str, path: str) -> None:
    """Write the flat summary of evaluation `stage` to `path` (and its markdown report)."""
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)
    try:
        r = render(recipe, stage)
        write_markdown(recipe, stage, r["markdown"], r["html"])
        flat = r["summary"]
    except Exception as e:  # noqa: BLE001  (a summary never fails the stage that was evaluated)
        print(f"[fastgen] {recipe.name}/{stage}: no summary: {type(e).__name__}: {e}", file=sys.stderr)
        flat = {}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(flat, indent=1) + "\n")


def markdown_path(recipe: Recipe, stage: str) -> str:
    return f"{storage.location(recipe, stage)}.report.md"


def html_path(recipe: Recipe, stage: str) -> str:
    return f"{storage.location(recipe, stage)}.report.html"


def write_markdown(recipe: Recipe, stage: str, md: str, page: str) -> str:
    """Write the markdown report and its HTML page next to the evaluation's folder (not inside it:
    the folder's files are its manifest's); return the markdown's location."""
    for loc, text in ((markdown_path(recipe, stage), md), (html_path(recipe, stage), page)):
        if storage.is_remote(loc):
            import fsspec

            with fsspec.open(loc, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            Path(loc).write_text(text, encoding="utf-8")
    return markdown_path(recipe, stage)


# --- sweeps ----------------------------------------------------------------------------------------

SWEEP_HEAD = ["trial", "overrides", "metric", "best 1-NFE", "above floor", "× teacher"]


def sweep_rows(folder: Path) -> list[list[str]]:
    """One row per evaluated trial of a sweep folder (`<storage>/sweeps/<id>/`): its overrides and
    its best 1-NFE student against the teacher (an unreadable evaluation is skipped, said on stderr)."""
    from .recipe import load_recipe

    body = []
    for trial in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for ev in sorted(trial.glob("*/*/manifest.json")):
            try:
                m = artifacts.read_manifest(ev.parent)
                if m.get("kind") != "evaluate":
                    continue
                r = load_recipe(m["recipe_path"])
                results = json.loads((ev.parent / "metrics.json").read_text())
            except (RecipeError, artifacts.DigestMismatch, KeyError, OSError, ValueError) as e:
                print(f"{ev.parent}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                      file=sys.stderr)
                continue
            prim, rs = rows(r, m, results)
            s = summary(prim, rs)
            body.append([trial.name.split("-", 1)[0], trial.name.split("-", 1)[-1], prim,
                         s.get("best_1nfe", "–"), _fmt(s.get("best_1nfe_above_floor"), 3),
                         _fmt(s.get("best_1nfe_ratio"), 3)])
    return body


def sweep_report(folder: Path, body: list[list[str]] | None = None) -> str:
    """`sweep_rows` (given, or read here) as a table."""
    body = sweep_rows(folder) if body is None else body
    if not body:
        return f"{folder}: no evaluated trial yet"
    return f"sweep {folder.name}: {len(body)} evaluated trial(s)\n\n{text_table(SWEEP_HEAD, body)}"


def main(argv: list[str] | None = None) -> int:
    from .sweep import load_with_overrides, parse_sets

    ap = argparse.ArgumentParser(prog="fastgen report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="recipe (name in params/ or file), or a sweep folder <storage>/sweeps/<id>")
    ap.add_argument("--stage", help="evaluation stage (default: every evaluate stage of the recipe)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="the overrides the recipe ran with (e.g. its storage.root)")
    ap.add_argument("--summary", metavar="FILE", help="also write the flat summary metrics file (DVC's metrics)")
    ap.add_argument("--quiet", action="store_true", help="print nothing (write the files only)")
    a = ap.parse_args(argv)
    if Path(a.target).is_dir():
        body = sweep_rows(Path(a.target))
        print(sweep_report(Path(a.target), body))
        return 0 if body else 1
    try:
        recipe = load_with_overrides(a.target, parse_sets(a.set))
    except RecipeError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    stages = [a.stage] if a.stage else eval_stages(recipe)
    if not stages or any(s not in recipe.stages or recipe.stages[s].kind != "evaluate" for s in stages):
        print(f"{recipe.path}: stages: no evaluate stage {a.stage or ''} to report".replace("  ", " "), file=sys.stderr)
        return 2
    missing = 0
    for s in stages:
        try:
            r = render(recipe, s)
        except (FileNotFoundError, artifacts.DigestMismatch):
            print(f"{recipe.name}/{s}: not evaluated yet (run `fastgen run {a.target}`)", file=sys.stderr)
            missing += 1
            continue
        where = write_markdown(recipe, s, r["markdown"], r["html"])
        if a.summary:
            Path(a.summary).parent.mkdir(parents=True, exist_ok=True)
            Path(a.summary).write_text(json.dumps(r["summary"], indent=1) + "\n")
        if not a.quiet:
            print(f"{r['text']}\n\n(markdown: {where}; with the plots: {html_path(recipe, s)})\n")
    return 1 if missing == len(stages) else 0


if __name__ == "__main__":
    sys.exit(main())
