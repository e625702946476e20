"""Provenance of an artifact, and verification of stored artifacts against their manifests.

    fastgen lineage outputs/toy_cd/cd [--json]   the tree of what made it, from the manifests
    fastgen verify outputs/toy_cd/cd              digests of it (and its inputs) still match?
    fastgen verify params/toy_cd.yaml             ... of every stage of a recipe
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastgen_core import artifacts

from . import storage


def manifest_tree(path: str | Path, _seen: set | None = None) -> dict:
    """The provenance tree of an artifact folder (local or remote), read from manifests alone."""
    path = str(path)
    m = storage.read_manifest(path)
    st = m["params"]["stage"]
    guide = st.get("guide") if m["kind"] == "weak_snapshot" else None
    trained = m["kind"] in ("teacher", "distill", "feature_net") or (guide or {}).get("mode") == "smaller"
    node = {
        "stage": m["stage"], "kind": m["kind"], "recipe": m["recipe"], "path": str(path),
        "digest": m["digest"], "params_digest": m["params_digest"],
        "code": m.get("code"), "data_digest": (m.get("data") or {}).get("digest"),
        "method": (st.get("method") or guide or None),
        "train": st.get("train") if trained else None,
        "mlflow_run_id": (m.get("mlflow") or {}).get("run_id"), "inputs": [],
    }
    for name, inp in m.get("inputs", {}).items():
        p = inp["path"]
        try:
            child = manifest_tree(p)
            child["role"] = inp["role"]
            child["recorded_digest"] = inp["digest"]
        except FileNotFoundError:
            child = {"stage": name, "role": inp["role"], "path": str(p), "digest": None,
                     "recorded_digest": inp["digest"], "missing": True, "inputs": []}
        node["inputs"].append(child)
    return node


def render(node: dict, prefix: str = "", last: bool = True, root: bool = True) -> list[str]:
    """A readable tree, one artifact per block."""
    head = "" if root else prefix + ("└── " if last else "├── ")
    role = f"[{node['role']}] " if node.get("role") else ""
    if node.get("missing"):
        lines = [f"{head}{role}{node['stage']}  MISSING at {node['path']} (recorded {node['recorded_digest'][:12]})"]
        return lines
    meth = node.get("method") or {}
    desc = ", ".join(f"{k}={v}" for k, v in meth.items())
    code = node.get("code") or {}
    lines = [f"{head}{role}{node['recipe']}/{node['stage']} ({node['kind']}{': ' + desc if desc else ''})"]
    pad = ("" if root else prefix + ("    " if last else "│   "))
    lines.append(f"{pad}  digest {node['digest'][:16]}  params {node['params_digest'][:16]}  "
                 f"data {(node.get('data_digest') or '?')[:16]}")
    lines.append(f"{pad}  code {(code.get('git_commit') or '?')[:12]}{' (dirty)' if code.get('dirty') else ''}"
                 f"  mlflow run {node.get('mlflow_run_id') or '-'}")
    if node.get("train"):
        t = node["train"]
        lines.append(f"{pad}  train steps={t['steps']} batch={t['batch_size']} lr={t['lr']} ema={t['ema_decay']}")
    kids = node["inputs"]
    for i, k in enumerate(kids):
        lines += render(k, pad, i == len(kids) - 1, root=False)
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
        from fastgen_core.recipe import load_recipe

        r = load_recipe(target)
        paths = [storage.location(r, s) for s in r.order()]
    else:
        paths = [target]
    problems = [p for path in paths for p in verify_artifact(path)]
    return problems, len(paths)


def main_lineage(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastgen lineage", description="provenance tree of an artifact")
    ap.add_argument("artifact", help="artifact folder (with manifest.json)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    a = ap.parse_args(argv)
    try:
        tree = manifest_tree(a.artifact)
    except FileNotFoundError:
        print(f"error: {a.artifact}: no manifest.json (not a fastgen artifact?)", file=sys.stderr)
        return 2
    print(json.dumps(tree, indent=2) if a.json else "\n".join(render(tree)))
    return 0


def main_verify(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastgen verify", description="check artifacts against their manifests")
    ap.add_argument("target", help="artifact folder, or a recipe YAML to verify its whole pipeline")
    a = ap.parse_args(argv)
    problems, n = verify_target(a.target)
    for p in problems:
        print(f"MISMATCH {p}")
    print(f"{n} artifact(s) checked, {len(problems)} problem(s)")
    return 1 if problems else 0
