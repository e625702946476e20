"""Provenance of an artifact, and verification of stored artifacts against their manifests.

    fastgen lineage TARGET [--json] [--source auto|manifests|mlflow] [--tracking-uri URI]
        TARGET: an artifact folder or s3:// URI (or a file in it, e.g. .../cd/model.safetensors),
        an MLflow run id, or a registered model
        (models:/NAME@ALIAS, models:/NAME/VERSION); the tree of what made it
    fastgen verify outputs/toy_cd/cd              digests of it (and its inputs) still match?
    fastgen verify params/toy_cd.yaml             ... of every stage of a recipe

The tree comes from either of two independent records: the manifests next to the artifacts (no
MLflow needed), or MLflow alone (each stage run's tags `fastgen.upstream_run.<stage>` and the
manifest it logged as `fastgen/manifest.json`; no files needed). `--source auto` reads the
manifests where they exist and falls back to MLflow for what is gone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from fastgen_core import artifacts
from fastgen_core.models import RESUME

from . import storage
from .tracking import MANIFEST_ARTIFACT, scrub

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# the stage settings shown besides method and train, by kind (the others are defaults it ignores)
SETTINGS = {"teacher": ("network",), "distill": ("network",), "feature_net": ("network",),
            "weak_snapshot": ("network",), "edit": ("edit",),
            "ode_pairs": ("pairs",), "evaluate": ("evaluate",)}


class LineageError(Exception):
    """A target that cannot be traced (one line, no traceback)."""


# --- reading manifests (local folders or any fsspec URL, e.g. s3://) -----------------------------
def read_manifest(loc: str | Path) -> dict:
    """`storage.read_manifest`, with an unreachable store reported as a missing manifest."""
    try:
        return storage.read_manifest(loc)
    except FileNotFoundError:
        raise
    except OSError as e:  # e.g. an unreachable bucket: as good as absent for lineage
        raise FileNotFoundError(f"{loc}: {e}") from None


def _node(m: dict, path: str, source: str) -> dict:
    """One artifact of the tree, from its manifest."""
    st = m["params"]["stage"]
    guide = st.get("guide") if m["kind"] == "weak_snapshot" else None
    # a stage of zero steps (an MSD router, stages/students.py) trains nothing: no train line
    trained = ((m["kind"] in ("teacher", "distill", "feature_net") or (guide or {}).get("mode") == "smaller")
               and (st.get("train") or {}).get("steps") != 0)
    return {
        "stage": m["stage"], "kind": m["kind"], "recipe": m["recipe"], "path": path, "source": source,
        "digest": m["digest"], "params_digest": m["params_digest"],
        "code": m.get("code"), "data_digest": (m.get("data") or {}).get("digest"),
        "method": (st.get("method") or guide or None),
        "train": st.get("train") if trained else None,
        "settings": {k: st[k] for k in SETTINGS.get(m["kind"], ()) if st.get(k) is not None},
        "seed": m["params"].get("seed"),
        "mlflow_run_id": (m.get("mlflow") or {}).get("run_id"), "inputs": [],
    }


def _missing(name: str, inp: dict) -> dict:
    return {"stage": name, "role": inp["role"], "path": inp["path"], "digest": None,
            "recorded_digest": inp["digest"], "missing": True, "inputs": []}


def _attach(node: dict, name: str, inp: dict, child: dict | None) -> None:
    """Add input `name` (recorded in the manifest as `inp`) to `node`: its subtree, or a missing leaf."""
    if child is None:
        node["inputs"].append(_missing(name, inp))
        return
    child["role"], child["recorded_digest"] = inp["role"], inp["digest"]
    node["inputs"].append(child)


def manifest_tree(path: str | Path, mlflow: "MlflowLineage | _Fallback | None" = None) -> dict:
    """The provenance tree of an artifact folder, read from manifests; an input whose files are
    gone is looked up in `mlflow` (when given) through this artifact's run, else marked missing."""
    m = read_manifest(path)
    node = _node(m, str(path), "manifest")
    for name, inp in m.get("inputs", {}).items():
        try:
            child = manifest_tree(inp["path"], mlflow)
        except FileNotFoundError:
            child = mlflow.upstream(node["mlflow_run_id"], name) if mlflow else None
        _attach(node, name, inp, child)
    return node


def manifest_related(path: str | Path, node: dict) -> list[dict]:
    """Artifacts of the same recipe folder made from the same inputs as `node` (siblings, e.g. the
    pair set the teacher of a student also made) or made from `node` itself (consumers, e.g. its
    evaluation)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path).rstrip("/"))
    parent = root.rsplit("/", 1)[0]
    out = []
    for mp in sorted(fs.glob(f"{parent}/*/{artifacts.MANIFEST}")):
        with fs.open(mp, "r") as f:
            m = json.load(f)
        if m["stage"] == node["stage"]:
            continue
        loc = mp.rsplit("/", 1)[0]
        if "://" in str(path):
            loc = fs.unstrip_protocol(loc)
        rel = _relation(node, {k: v["digest"] for k, v in m.get("inputs", {}).items()}, m["stage"])
        if rel:
            out.append({**rel, "stage": m["stage"], "kind": m["kind"], "recipe": m["recipe"], "path": loc,
                        "digest": m["digest"], "mlflow_run_id": (m.get("mlflow") or {}).get("run_id")})
    return sorted(out, key=lambda r: (r["relation"] != "sibling", r["stage"]))


def _ancestors(node: dict) -> set[str]:
    return {a for i in node["inputs"] for a in {i["stage"]} | _ancestors(i)}


def _relation(node: dict, their_inputs: dict[str, str], stage: str) -> dict | None:
    if stage in _ancestors(node):
        return None  # already in the tree
    if their_inputs.get(node["stage"]) == node["digest"]:
        return {"relation": "consumer"}
    shared = sorted(i["stage"] for i in node["inputs"]
                    if i.get("digest") and their_inputs.get(i["stage"]) == (i.get("recorded_digest") or i["digest"]))
    return {"relation": "sibling", "via": shared} if shared else None


# --- reading MLflow ------------------------------------------------------------------------------
def default_tracking_uri() -> str:
    from .tracking import PROJECT

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (LineageError) if the store is not there: a missing SQLite file (which MLflow would
    otherwise create empty) or a server that does not answer on its port."""
    u = urlparse(uri)
    if u.scheme == "sqlite":
        f = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else u.path
        if not Path(f).exists():
            raise LineageError(f"MLflow store {uri}: no such database file")
    elif u.scheme in ("http", "https"):
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        except OSError as e:
            raise LineageError(f"MLflow server {u.scheme}://{u.hostname}:{u.port}: unreachable ({e.strerror or e})") from None


class MlflowLineage:
    """The same tree, from an MLflow store alone."""

    def __init__(self, uri: str):
        check_reachable(uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        self.uri, self.client = uri, MlflowClient(uri)
        self._manifests: dict[str, dict] = {}

    def manifest(self, run_id: str) -> dict:
        if run_id not in self._manifests:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    p = self.client.download_artifacts(run_id, MANIFEST_ARTIFACT, tmp)
                except Exception as e:
                    raise LineageError(f"MLflow run {run_id}: no {MANIFEST_ARTIFACT} artifact ({type(e).__name__})") from None
                self._manifests[run_id] = json.loads(Path(p).read_text())
        return self._manifests[run_id]

    def tree(self, run_id: str) -> dict:
        run = self.client.get_run(run_id)
        m, tags = self.manifest(run_id), run.data.tags
        node = _node(m, tags.get("fastgen.storage_uri") or tags.get("fastgen.output", "?"), "mlflow")
        node["mlflow_run_id"] = run_id
        for name, inp in m.get("inputs", {}).items():
            _attach(node, name, inp, self.upstream(run_id, name, tags))
        return node

    def upstream(self, run_id: str | None, name: str, tags: dict | None = None) -> dict | None:
        """The tree of input `name` of run `run_id`, through its tag fastgen.upstream_run.<name>."""
        if not run_id:
            return None
        try:
            tags = tags or self.client.get_run(run_id).data.tags
            up = tags.get(f"fastgen.upstream_run.{name}")
            return self.tree(up) if up and up != "None" else None
        except LineageError:
            return None
        except Exception as e:  # a deleted run
            if "not found" in str(e).lower() or "RESOURCE_DOES_NOT_EXIST" in str(e):
                return None
            raise

    def related(self, node: dict) -> list[dict]:
        """Siblings and consumers (see manifest_related), from the runs' fastgen.input.* tags."""
        run = self.client.get_run(node["mlflow_run_id"])
        exp = run.info.experiment_id
        found: dict[str, dict] = {}
        queries = [f"tags.`fastgen.input.{node['stage']}` = '{node['digest']}'"]
        queries += [f"tags.`fastgen.input.{i['stage']}` = '{i.get('recorded_digest') or i['digest']}'"
                    for i in node["inputs"] if i.get("recorded_digest") or i.get("digest")]
        for q in queries:
            for r in self.client.search_runs([exp], q + " and attributes.status = 'FINISHED'",
                                             order_by=["attributes.start_time DESC"], max_results=50):
                t = r.data.tags
                if t.get("fastgen.stage") in (None, node["stage"]) or t["fastgen.stage"] in found:
                    continue
                rel = _relation(node, {k[len("fastgen.input."):]: v for k, v in t.items()
                                       if k.startswith("fastgen.input.")}, t["fastgen.stage"])
                if rel and t.get("fastgen.output_digest"):
                    found[t["fastgen.stage"]] = {**rel, "stage": t["fastgen.stage"], "kind": t.get("fastgen.kind"),
                                                 "recipe": t.get("fastgen.recipe"), "digest": t["fastgen.output_digest"],
                                                 "path": t.get("fastgen.storage_uri") or t.get("fastgen.output"),
                                                 "mlflow_run_id": r.info.run_id}
        return sorted(found.values(), key=lambda r: (r["relation"] != "sibling", r["stage"]))

    def model_version(self, uri: str):
        """The registered model version models:/NAME@ALIAS or models:/NAME/VERSION."""
        rest = uri[len("models:/"):]
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = self.client.get_model_version_by_alias(name, alias)
            else:
                name, version = rest.rsplit("/", 1)
                mv = self.client.get_model_version(name, version)
        except Exception as e:
            raise LineageError(f"{uri}: no such registered model version ({type(e).__name__})") from None
        return mv

    def run_of(self, mv, uri: str) -> str:
        """The run that made a registered model version."""
        if mv.run_id:
            return mv.run_id
        if mv.model_id:
            return self.client.get_logged_model(mv.model_id).source_run_id
        raise LineageError(f"{uri}: the model version records no run")

    def run_of_path(self, path: str) -> str:
        """The latest finished stage run whose output was `path` (an artifact folder or URI)."""
        want = path if "://" in path else str(Path(path).resolve())
        if "'" in want:  # it goes into an MLflow filter string between single quotes
            raise LineageError(f"{path}: a path with a quote (') cannot be looked up in MLflow")
        for key in ("fastgen.storage_uri", "fastgen.output"):
            exps = [e.experiment_id for e in self.client.search_experiments()]
            runs = self.client.search_runs(exps, f"tags.`{key}` = '{want}' and attributes.status = 'FINISHED'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
            if runs:
                return runs[0].info.run_id
        raise LineageError(f"{path}: no manifest there, and no MLflow run in {scrub(self.uri)} produced it")


ARTIFACT_FILES = ("model.safetensors", "model.json", RESUME, "pairs.npz", "metrics.json", artifacts.MANIFEST)


def _artifact_of(target: str) -> str:
    """The artifact folder of a file in it (e.g. a student's model.safetensors), else `target`."""
    t = target.rstrip("/")
    if t.rsplit("/", 1)[-1] in ARTIFACT_FILES or ("://" not in t and Path(t).is_file()):
        return t.rsplit("/", 1)[0]
    return t


class _Fallback:
    """MLflow for the inputs whose files are gone, opened only if one is (none if unreachable)."""

    def __init__(self, uri: str):
        self.uri, self.ml = uri, None

    def upstream(self, run_id: str | None, name: str) -> dict | None:
        if self.ml is None:
            try:
                self.ml = MlflowLineage(self.uri)
            except LineageError:
                self.ml = False
        return self.ml.upstream(run_id, name) if self.ml else None


def lineage(target: str, source: str = "auto", tracking_uri: str | None = None, related: bool = True) -> dict:
    """The provenance tree of `target` (see module docstring), with its related artifacts."""
    uri = tracking_uri or default_tracking_uri()
    is_run, is_model = bool(RUN_ID.match(target)), target.startswith("models:/")
    if not (is_run or is_model):
        target = _artifact_of(target)
    if source == "manifests" and (is_run or is_model):
        raise LineageError(f"{target}: a run id or registered model can only be traced in MLflow (--source mlflow/auto)")
    if not (is_run or is_model) and source != "mlflow":
        try:
            read_manifest(target)
        except FileNotFoundError:
            if source == "manifests":
                raise LineageError(f"{target}: no {artifacts.MANIFEST} (not a fastgen artifact?)") from None
        else:
            tree = manifest_tree(target, _Fallback(uri) if source == "auto" else None)
            if related:
                tree["related"] = manifest_related(target, tree)
            return tree
    ml = MlflowLineage(uri)
    mv = ml.model_version(target) if is_model else None
    run_id = ml.run_of(mv, target) if is_model else target if is_run else ml.run_of_path(target)
    tree = ml.tree(run_id)
    if mv is not None:
        tree["registered"] = {"name": mv.name, "version": str(mv.version), "aliases": list(mv.aliases or []),
                              "tags": dict(mv.tags)}
    if related:
        tree["related"] = ml.related(tree)
    return tree


def render(node: dict, prefix: str = "", last: bool = True, root: bool = True) -> list[str]:
    """A readable tree, one artifact per block."""
    head = "" if root else prefix + ("└── " if last else "├── ")
    role = f"[{node['role']}] " if node.get("role") else ""
    reg = []
    if root and node.get("registered"):
        r = node["registered"]
        figs = {k[len("eval."):]: v for k, v in r["tags"].items() if k.startswith("eval.")}
        reg = [f"registered model {r['name']} version {r['version']}"
               f"{' @' + ', @'.join(r['aliases']) if r['aliases'] else ''}"
               + (f": {figs.get('metric')} above floor at 1 NFE {float(figs['above_floor_1nfe']):.4g}"
                  f" (pass threshold {float(figs['threshold']):.4g}, teacher {float(figs['teacher_above_floor']):.4g})"
                  if "above_floor_1nfe" in figs else "")]
    if node.get("missing"):
        lines = [f"{head}{role}{node['stage']}  MISSING at {node['path']} (recorded {node['recorded_digest'][:12]})"]
        return lines
    meth = node.get("method") or {}
    desc = ", ".join(f"{k}={v}" for k, v in meth.items())
    code = node.get("code") or {}
    lines = reg + [f"{head}{role}{node['recipe']}/{node['stage']} ({node['kind']}{': ' + desc if desc else ''})"]
    pad = ("" if root else prefix + ("    " if last else "│   "))
    lines.append(f"{pad}  digest {node['digest'][:16]}  params {node['params_digest'][:16]}  "
                 f"data {(node.get('data_digest') or '?')[:16]}")
    lines.append(f"{pad}  code {(code.get('git_commit') or '?')[:12]}{' (dirty)' if code.get('dirty') else ''}"
                 f"  mlflow run {node.get('mlflow_run_id') or '-'}")
    if node.get("train"):
        t = node["train"]
        lines.append(f"{pad}  train steps={t['steps']} batch={t['batch_size']} lr={t['lr']} ema={t['ema_decay']}")
    for k, v in (node.get("settings") or {}).items():
        desc = " ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v
        lines.append(f"{pad}  {k} {desc}")
    lines.append(f"{pad}  at {node['path']}  (from {node.get('source', 'manifest')})")
    kids = node["inputs"]
    for i, k in enumerate(kids):
        lines += render(k, pad, i == len(kids) - 1, root=False)
    if root and node.get("related"):
        lines.append("related (same inputs, or made from this):")
        for i, r in enumerate(node["related"]):
            how = f"sibling via {', '.join(r['via'])}" if r["relation"] == "sibling" else "consumer"
            lines.append(f"{'└── ' if i == len(node['related']) - 1 else '├── '}[{how}] {r['recipe']}/{r['stage']} "
                         f"({r['kind']})  digest {r['digest'][:16]}  mlflow run {r.get('mlflow_run_id') or '-'}")
    return lines


def verify_artifact(path: str | Path) -> list[str]:
    """Problems with one artifact: content vs its manifest, and inputs changed since it was made."""
    problems = []
    try:
        m = storage.verify(path)
    except (artifacts.DigestMismatch, FileNotFoundError) as e:
        return [str(e)]
    for name, inp in m.get("inputs", {}).items():
        p = inp["path"]
        try:
            now = storage.read_manifest(p)["digest"]
        except FileNotFoundError:
            problems.append(f"{path}: input {name!r} is missing ({p})")
            continue
        if now != inp["digest"]:
            problems.append(f"{path}: input {name!r} changed since it was made ({inp['digest'][:12]} -> {now[:12]})")
    return problems


def verify_target(target: str) -> tuple[list[str], int]:
    if target.endswith((".yaml", ".yml")):
        from stages.recipe import load_recipe

        r = load_recipe(target)
        paths = [storage.location(r, s) for s in r.order()]
    else:
        paths = [target]
    problems = [p for path in paths for p in verify_artifact(path)]
    return problems, len(paths)


def main_lineage(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastgen lineage", description="provenance tree of an artifact")
    ap.add_argument("target", help="artifact folder or URI (s3://...), MLflow run id, or models:/NAME@ALIAS | models:/NAME/VERSION")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    ap.add_argument("--source", choices=("auto", "manifests", "mlflow"), default="auto",
                    help="read the manifests, MLflow, or manifests where present and MLflow for the rest (default)")
    ap.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's mlflow.db)")
    a = ap.parse_args(argv)
    try:
        tree = lineage(a.target, a.source, a.tracking_uri)
    except (LineageError, artifacts.DigestMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(tree, indent=2) if a.json else "\n".join(render(tree)))
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
    return 0


def main_verify(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastgen verify", description="check artifacts against their manifests")
    ap.add_argument("target", help="artifact folder, or a recipe YAML to verify its whole pipeline")
    a = ap.parse_args(argv)
    from stages.recipe import RecipeError

    try:
        problems, n = verify_target(a.target)
    except RecipeError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    for p in problems:
        print(f"MISMATCH {p}")
    print(f"{n} artifact(s) checked, {len(problems)} problem(s)")
    return 1 if problems else 0
