"""Shared fixtures: a tiny version of params/toy_cd.yaml (same stage graph, seconds instead of
minutes) written into a test's tmp folder, with its own storage root and MLflow store.

Torch runs single-threaded in the tests (and in the stage processes and Ray workers they start):
the test machine has 2 cores shared with other jobs, and two intra-op threads contending with
them make the tiny networks' steps 10-100x slower than one thread.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The processes the tests start (`dvc repro`'s stages, Prefect's flow runs, Ray's workers) run the
# project from throwaway copies. Where PYTHONDONTWRITEBYTECODE is set (the test machine sets it) each
# of them compiled the project's ~60 modules from source again (~0.4 s of CPU a process, ~0.5 s a
# DVC stage in a profile of shrunk digits_msd); without it the first process of a copy writes its
# `__pycache__` (ignored by git; DVC's dependencies are the .py files) and the rest read it, as on a
# user's machine. The installed libraries are compiled at install time either way (Makefile).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import pytest  # noqa: E402
import yaml  # noqa: E402

# Prefect sets up its console log handler on import, bound to the sys.stderr of that moment: import
# it here, under the session's capture, not inside a test whose capsys/capfd stream closes after it
import prefect.main  # noqa: E402,F401
import servers  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent

# real servers (moto S3, `mlflow server`) as session fixtures: s3_server, mlflow_server
pytest_plugins = ["servers"]

# How pytest-xdist (`--dist loadgroup`) shares the tests between its two processes. It hands out
# units of work: the tests of one `xdist_group` together, any other test alone. A module-scoped
# fixture (a Prefect server with a worker, an MLflow server, a model trained once for a module's
# checks) is made once in every process that runs one of its module's tests, so the tests of a module
# without a group of their own go as one unit, named after the file: each such fixture is made once.
# Units go out in collection order (xdist's reordering by test count is switched off), the longest
# first (LONG_FIRST, from a measured run): the long ones start early and the many short ones fill the
# gaps at the end, instead of one process finishing a long unit alone.
_SHARED_PREFECT = pytest.StashKey[tuple]()
LONG_FIRST = ("test_deploy.py", "ray", "recipe-digits_msd", "recipe-digits_crosspaper", "test_dvc.py",
              "test_faults.py", "test_dvc_exp.py", "test_s3_storage.py", "recipe-digits_guided", "test_gan.py",
              "recipe-imagenet64_msd", "recipe-toy_dmd", "recipe-digits_bits", "recipe-digits_consistency",
              "recipe-toy_reflow", "recipe-toy_ayf", "recipe-toy_caf", "recipe-toy_cd")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    # pytest-xdist's controller (test processes to come, none of its own tests): one Prefect API for
    # them all, started now in the background (see `prefect_harness`)
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput") \
            and not config.option.collectonly:
        d = Path(tempfile.mkdtemp(prefix="fastgen-prefect-"))
        proc, api = servers.start_prefect_api(d)
        config.stash[_SHARED_PREFECT] = (proc, d)
        os.environ[servers.SHARED_PREFECT_API] = api  # the test processes inherit these
        os.environ[servers.SHARED_PREFECT_LOG] = str(d / "prefect-api.log")


def pytest_unconfigure(config):
    shared = config.stash.get(_SHARED_PREFECT, None)
    if shared:
        servers.stop(shared[0])
        shutil.rmtree(shared[1], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.get_closest_marker("xdist_group").args[0], len(LONG_FIRST)))

# Same stages as params/toy_cd.yaml: teacher -> pairs -> cd -> eval, scaled down.
TINY = {
    "name": "tiny_cd",
    "description": "params/toy_cd.yaml scaled down for tests",
    "seed": 0,
    "data": {"kind": "toy", "name": "8gaussians", "n_train": 2000, "n_test": 500},
    "noise": {"sigma_max": 80.0},
    "stages": {
        "teacher": {
            "kind": "teacher",
            "method": {"name": "edm"},
            "network": {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16},
            # ~2 s on one CPU thread, and enough to cover all 8 modes at 35 NFE
            "train": {"steps": 400, "batch_size": 256, "lr": 3.0e-3, "ema_decay": 0.95,
                      "lr_warmup": 10, "log_every": 20, "ckpt_every": 200},
        },
        "pairs": {
            "kind": "ode_pairs",
            "inputs": {"teacher": "teacher"},
            "pairs": {"n_pairs": 500, "steps": 18},
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
            "evaluate": {"n_samples": 500, "seeds": [0, 1], "nfe": [1, 2], "teacher_nfe": [1, 35]},
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


def write_tiny_recipe(root: str | Path, only: list[str] | None = None, mlflow_template: Path | None = None,
                      **overrides) -> Path:
    """Write the tiny recipe into `root` and return its path.

    Its storage root is `<root>/outputs` and its MLflow store `sqlite:///<root>/mlflow.db` (a copy
    of `mlflow_template`, an already migrated empty store, when given). Overrides are deep-merged
    into the recipe, e.g. `compute={"backend": "ray", "num_workers": 2}` or
    `stages={"teacher": {"train": {"steps": 50}}}`; `only=[...]` keeps just those stages.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    raw = _merge(TINY, overrides)
    if only is not None:
        raw["stages"] = {k: v for k, v in raw["stages"].items() if k in only}
    raw.setdefault("storage", {}).setdefault("root", str(root / "outputs"))
    raw.setdefault("tracking", {}).setdefault("uri", f"sqlite:///{root / 'mlflow.db'}")
    if mlflow_template is not None and not (root / "mlflow.db").exists():
        shutil.copy(mlflow_template, root / "mlflow.db")
    path = root / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stagewise(recipe, tag: str) -> tuple[dict, str]:
    """Every stage of `recipe` in order, as `dvc repro` runs them, under one fresh
    FASTGEN_INVOCATION (one MLflow parent run); returns (stage -> manifest, the invocation)."""
    from stages.runtime import run_stage

    invocation = f"test-{tag}-{uuid.uuid4().hex[:8]}"
    saved = os.environ.get("FASTGEN_INVOCATION")
    os.environ["FASTGEN_INVOCATION"] = invocation
    try:
        return {s: run_stage(recipe, s) for s in recipe.order()}, invocation
    finally:
        if saved is None:
            os.environ.pop("FASTGEN_INVOCATION", None)
        else:
            os.environ["FASTGEN_INVOCATION"] = saved


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """OMP_NUM_THREADS only counts if set before torch is first imported; make it hold anyway."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store: creating one costs seconds of schema migrations,
    copying it costs nothing."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tiny_recipe(tmp_path, mlflow_template):
    """Factory: `tiny_recipe(root=None, only=None, **overrides) -> Path` (see write_tiny_recipe);
    root defaults to the test's tmp_path."""

    def make(root: str | Path | None = None, only: list[str] | None = None, **overrides) -> Path:
        return write_tiny_recipe(tmp_path if root is None else root, only, mlflow_template, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_recipe_session(tmp_path_factory, mlflow_template):
    """Session-scoped factory: `tiny_recipe_session(name, only=None, **overrides) -> Path`, each
    call in a fresh folder named after `name`."""

    def make(name: str, only: list[str] | None = None, **overrides) -> Path:
        return write_tiny_recipe(tmp_path_factory.mktemp(name), only, mlflow_template, **overrides)

    return make


@pytest.fixture(scope="session")
def stagewise_run(tiny_recipe_session):
    """The tiny pipeline run the way `dvc repro` runs it: `run_stage` for each stage in order, all
    under one FASTGEN_INVOCATION (one MLflow parent run). Shared by the flow and MLflow tests."""
    from stages.recipe import load_recipe
    from stages.runtime import run_stage

    path = tiny_recipe_session("stagewise")
    recipe = load_recipe(path)
    manifests, invocation = run_stagewise(recipe, "stagewise")
    return SimpleNamespace(path=path, recipe=recipe, invocation=invocation, manifests=manifests,
                           root=path.parent, uri=recipe.tracking.uri)


@pytest.fixture(scope="session")
def stage_forkserver(tmp_path_factory):
    """A warm interpreter for `dvc repro`'s stage processes (tests/forkserver.py), once per test
    process: `route(env)` is `env` with the stage commands sent to it."""
    import forkserver

    proc, route = forkserver.start(tmp_path_factory.mktemp("fs"))
    yield route
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def _shared_prefect_api(api: str):
    """Prefect's settings pointing at `api`, as Prefect's test harness points them at its own server:
    in this context and, as the process-global settings, in threads started later (a new thread
    starts with an empty `contextvars` context, and without an API URL it would start an ephemeral
    server of its own)."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), \
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
        yield


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API server and database for the session: under pytest-xdist the one the
    controller started for every test process (tests/servers.py `start_prefect_api`, the way
    Prefect's test harness starts its server), else Prefect's test harness itself."""
    from prefect.testing.utilities import prefect_test_harness

    from prefect import flow

    api = os.environ.get(servers.SHARED_PREFECT_API)
    if api:
        servers.wait_http(f"{api}/health", None, Path(os.environ[servers.SHARED_PREFECT_LOG]), timeout=180)
    # the API server is a subprocess: generous start-up time on a loaded 2-core machine
    with _shared_prefect_api(api) if api else prefect_test_harness(server_startup_timeout=180):
        # Prefect's console log handler takes the sys.stderr of the first flow run: run one here, so
        # that it is the session's, not the stream of a test's capfd (closed when that test ends)
        flow(name="warm-up")(lambda: None)()
        yield


@pytest.fixture
def clean_invocation(monkeypatch):
    """A fresh MLflow invocation for the test: no FASTGEN_INVOCATION inherited from the
    environment or an earlier test, and no solo invocation id cached by stages.tracking."""
    from stages import tracking

    monkeypatch.delenv("FASTGEN_INVOCATION", raising=False)
    monkeypatch.setattr(tracking, "_solo", None)
    yield
    os.environ.pop("FASTGEN_INVOCATION", None)

