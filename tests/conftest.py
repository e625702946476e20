"""Shared fixtures: a tiny version of params/toy_cd.yaml (same stage graph, seconds instead of
minutes) written into a test's tmp folder, with its own storage root and MLflow store."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent

# Same stages as params/toy_cd.yaml: teacher -> pairs -> cd -> eval, scaled down.
TINY = {
    "name": "tiny_cd",
    "description": "tiny toy_cd for tests",
    "seed": 0,
    "data": {"kind": "toy", "name": "8gaussians", "n_train": 2000, "n_test": 500},
    "noise": {"sigma_max": 80.0},
    "stages": {
        "teacher": {
            "kind": "teacher",
            "method": {"name": "edm"},
            "network": {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16},
            "train": {"steps": 150, "batch_size": 128, "lr": 2.0e-3, "ema_decay": 0.9,
                      "lr_warmup": 10, "log_every": 10, "ckpt_every": 100},
        },
        "pairs": {
            "kind": "ode_pairs",
            "inputs": {"teacher": "teacher"},
            "pairs": {"n_pairs": 500, "steps": 6},
        },
        "cd": {
            "kind": "distill",
            "inputs": {"teacher": "teacher"},
            "method": {"name": "cd", "N": 10, "mu": 0.0, "metric": "l2"},
            "train": {"steps": 100, "batch_size": 128, "lr": 5.0e-4, "ema_decay": 0.9,
                      "log_every": 10, "ckpt_every": 100},
        },
        "eval": {
            "kind": "evaluate",
            "inputs": {"models": ["teacher", "cd"], "pairs": "pairs"},
            "evaluate": {"n_samples": 500, "seeds": [0, 1], "nfe": [1, 2], "teacher_nfe": [1, 5]},
        },
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture
def tiny_recipe(tmp_path):
    """Factory: `tiny_recipe(**overrides)` writes the tiny recipe and returns its path.

    Overrides are deep-merged into the recipe dict, e.g.
    `tiny_recipe(compute={"backend": "ray", "num_workers": 2})` or
    `tiny_recipe(stages={"teacher": {"train": {"steps": 50}}})`. `only=[...]` keeps just those
    stages (their inputs must be among them); `root=` picks the folder holding the recipe file,
    storage (`<root>/outputs`) and the MLflow store (`<root>/mlflow.db`, artifacts in
    `<root>/mlartifacts`). Each call with a new `root` is an independent world.
    """

    def make(root: str | Path | None = None, only: list[str] | None = None, **overrides) -> Path:
        root = Path(root) if root is not None else tmp_path
        root.mkdir(parents=True, exist_ok=True)
        raw = _merge(TINY, overrides)
        if only is not None:
            raw["stages"] = {k: v for k, v in raw["stages"].items() if k in only}
        raw.setdefault("storage", {})["root"] = str((root / "outputs").resolve())
        raw.setdefault("tracking", {}).setdefault("uri", f"sqlite:///{(root / 'mlflow.db').resolve()}")
        path = root / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


@pytest.fixture
def isolated_cwd(tmp_path, monkeypatch):
    """Run in tmp_path: MLflow's default artifact root for a sqlite store is ./mlruns of the
    working directory, which must not be the project's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fresh_invocation(monkeypatch):
    """A clean FASTGEN_INVOCATION for each test (tracking.invocation_id caches one in os.environ)."""
    monkeypatch.delenv("FASTGEN_INVOCATION", raising=False)
    yield
    os.environ.pop("FASTGEN_INVOCATION", None)
