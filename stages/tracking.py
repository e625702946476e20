"""MLflow tracking: one parent run per pipeline invocation, one nested child run per stage.

Default store: a SQLite file `mlflow.db` in the project (no server needed). `MLFLOW_TRACKING_URI`
or the recipe's `tracking.uri` point it at a server. Only the `MlflowClient` API is used (no
global active-run state), so concurrent stages in one process (Prefect) cannot cross their runs.

The invocation a stage belongs to: `$FASTGEN_INVOCATION` if set (the Prefect flow and
`fastgen run` set it), else the `dvc repro` process this stage runs under, else a fresh one.
"""
from __future__ import annotations

import os
import re
import threading
import time
import uuid
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def tracking_uri(recipe) -> str:
    return recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT / 'mlflow.db'}"


def _proc_start(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


# Kept here, not in os.environ: a flow started later in this process must see no
# FASTGEN_INVOCATION and make its own, instead of adopting these stages' parent run.
_solo: str | None = None


def invocation_id() -> str:
    """Identify the pipeline invocation this process is part of (see module docstring)."""
    if os.environ.get("FASTGEN_INVOCATION"):
        return os.environ["FASTGEN_INVOCATION"]
    pid = os.getppid()
    try:
        for _ in range(8):  # walk up to a `dvc repro` ancestor
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(c.endswith(b"dvc") for c in cmd[:2]) and b"repro" in cmd:
                return f"dvc-{pid}-{_proc_start(pid)}"
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if pid <= 1:
                break
    except (OSError, ValueError, IndexError):
        pass
    global _solo
    if _solo is None:  # one for every stage this process runs outside dvc and a flow
        _solo = f"solo-{uuid.uuid4().hex[:12]}"
    return _solo


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def _metric_name(key: str) -> str:
    """MLflow metric names allow letters, digits and _ - . / : space only."""
    return key.replace("@", "_at_").replace("+", "_plus_")


class Tracker:
    """The child run of one stage. Methods are no-ops when tracking is disabled."""

    def __init__(self, client=None, run_id: str | None = None, parent_id: str | None = None, uri: str | None = None):
        self.client, self.run_id, self.parent_id, self.uri = client, run_id, parent_id, uri

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.client:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(_metric_name(k), float(v), ts, step)
                                                        for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        if self.client:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store's database file
    (`<db folder>/mlruns/<experiment>`), not in MLflow's default `./mlruns` of whatever the working
    directory happens to be; None (the server's default) for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlruns" / re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)).as_uri()


def _experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


# Stages of one invocation running concurrently in this process (Prefect threads) must find or
# create the same parent run: the search-then-create below is not atomic on its own.
_parent_lock = threading.Lock()


def start_stage_run(recipe, stage: str, params: dict, tags: dict) -> Tracker:
    if not recipe.tracking.enabled:
        return Tracker()
    from mlflow import MlflowClient

    uri = tracking_uri(recipe)
    client = MlflowClient(uri)
    inv = invocation_id()
    with _parent_lock:
        exp = _experiment(client, recipe.tracking.experiment or recipe.name, uri)
        found = client.search_runs([exp], f"tags.`fastgen.invocation` = '{inv}' and tags.`fastgen.level` = 'pipeline'",
                                   max_results=1)
        if found:
            parent = found[0].info.run_id
        else:
            parent = client.create_run(exp, run_name=f"{recipe.name}", tags={
                "fastgen.invocation": inv, "fastgen.level": "pipeline", "fastgen.recipe": recipe.name,
                "fastgen.recipe_path": recipe.path, "fastgen.recipe_digest": recipe.digest()}).info.run_id
    run = client.create_run(exp, run_name=stage, tags={
        "mlflow.parentRunId": parent, "fastgen.invocation": inv, "fastgen.level": "stage",
        "fastgen.recipe": recipe.name, "fastgen.stage": stage, **{k: str(v) for k, v in tags.items()}})
    rid = run.info.run_id
    flat = flatten(params)
    items = list(flat.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(rid, params=[Param(k, v) for k, v in items[i:i + 100]])
    return Tracker(client, rid, parent, uri)


def end_stage_run(tr: Tracker, ok: bool) -> None:
    if tr.client:
        status = "FINISHED" if ok else "FAILED"
        tr.client.set_terminated(tr.run_id, status)
        # the parent is FAILED once any stage failed: a later stage's success does not undo that
        if not ok or tr.client.get_run(tr.parent_id).info.status != "FAILED":
            tr.client.set_terminated(tr.parent_id, status)
