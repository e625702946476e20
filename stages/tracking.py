"""MLflow tracking: one parent run per pipeline invocation, one nested child run per stage.

Default store: a SQLite file `mlflow.db` in the project (no server needed). `MLFLOW_TRACKING_URI`
or the recipe's `tracking.uri` point it at a server. Only the `MlflowClient` API is used (no
global active-run state), so concurrent stages in one process (Prefect) cannot cross their runs.

The invocation a stage belongs to: the Prefect flow run it is a task of (`invocation_scope`), else
`$FASTGEN_INVOCATION` if set, else the `dvc exp run` experiment it runs for ($DVC_EXP_NAME, set by
DVC for queued and workspace experiments), else the `dvc repro` process this stage runs under, else
a fresh one. Under `dvc exp` the default store is the main workspace's `mlflow.db` ($DVC_ROOT), not
one in DVC's temporary copy. A sweep trial's pipeline run is nested under the sweep's run
(`invocation_scope(..., pipeline_tags)`; flows/sweep.py).

Honest run states: every run is tagged with the process that opened it (`fastgen.process`: host,
pid and the process's start time). A stage run ends FINISHED, or FAILED with its one-line reason
(tag `fastgen.failure`). A run left RUNNING by a process that is gone (killed, e.g. by SIGKILL) is
marked KILLED when the same stage starts again (`end_stale_runs`); runs of live processes are left
alone, and a process on another host is never judged dead.
"""
from __future__ import annotations

import contextvars
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .timing import pause_point

PROJECT = Path(__file__).resolve().parent.parent


def workspace() -> Path:
    """The project folder whose `mlflow.db` is the default store: under `dvc exp run` (which runs
    stages in a temporary copy, `.dvc/tmp/exps/...`, lost afterwards) the main workspace DVC names
    in $DVC_ROOT; else this project."""
    if os.environ.get("DVC_EXP_NAME") and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    return PROJECT


def tracking_uri(recipe) -> str:
    return recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace() / 'mlflow.db'}"


def _proc_start(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def process_id() -> str:
    """This process as `host:pid:start` (start: its start time in clock ticks since boot, so that a
    later process given the same pid is not taken for it)."""
    try:
        start = _proc_start(os.getpid())
    except (OSError, IndexError):
        start = "?"
    return f"{socket.gethostname()}:{os.getpid()}:{start}"


def process_gone(proc: str) -> bool:
    """Whether the process named by a `process_id` has ended. Only a process of this host can be
    judged; one of another host (or a malformed name) counts as alive."""
    try:
        host, pid, start = proc.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        return start != "?" and _proc_start(pid) != start
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except OSError:
            return False


# Kept here, not in os.environ: a flow started later in this process must see no
# FASTGEN_INVOCATION and make its own, instead of adopting these stages' parent run.
_solo: str | None = None
# The invocation of the flow run whose task is running in this context (threads of one process may
# run tasks of several flow runs).
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgen_invocation", default=None)
# Tags for the pipeline run of that invocation (a sweep trial: its overrides and its sweep's run as parent)
_pipeline_tags: contextvars.ContextVar[dict] = contextvars.ContextVar("fastgen_pipeline_tags", default={})


@contextmanager
def invocation_scope(invocation: str, pipeline_tags: dict | None = None):
    """Stages started inside the block belong to `invocation` (a flow run's); `pipeline_tags` are
    set on its pipeline run when it is created (e.g. `mlflow.parentRunId` of a sweep run)."""
    token = _scoped.set(invocation)
    tags = _pipeline_tags.set(dict(pipeline_tags or {}))
    try:
        yield
    finally:
        _scoped.reset(token)
        _pipeline_tags.reset(tags)


def invocation_id() -> str:
    """Identify the pipeline invocation this process is part of (see module docstring)."""
    if _scoped.get():
        return _scoped.get()
    env = os.environ.get("FASTGEN_INVOCATION")
    if not env and os.environ.get("DVC_EXP_NAME"):  # one experiment of `dvc exp run` (queued or not): name, baseline
        env = f"dvc-exp-{os.environ['DVC_EXP_NAME']}-{os.environ.get('DVC_EXP_BASELINE_REV', '')[:12]}"
    if env:  # a quote would break the MLflow filter strings the id goes into
        return env.replace("'", "_")
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


def _invocation_tags(inv: str) -> dict[str, str]:
    """What a pipeline run says about where it ran: the DVC experiment, if any."""
    if inv.startswith("dvc-exp-") and os.environ.get("DVC_EXP_NAME"):
        return {"fastgen.dvc_exp": os.environ["DVC_EXP_NAME"],
                "fastgen.dvc_exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", "")}
    return {}


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

    def __init__(self, client=None, run_id: str | None = None, parent_id: str | None = None, uri: str | None = None,
                 upstream: dict[str, str] | None = None, experiment_id: str | None = None):
        self.client, self.run_id, self.parent_id, self.uri = client, run_id, parent_id, uri
        self.upstream = upstream or {}  # input stage -> its MLflow run id
        self.experiment_id = experiment_id

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
        """In requests of up to 100 tags (MLflow's batch limit), not one per tag: one transaction of a
        SQL store, one call of a tracking server."""
        if self.client:
            from mlflow.entities import RunTag

            log_batches(self.client, self.run_id, tags=[RunTag(k, scrub(v)) for k, v in tags.items()])


def log_batches(client, run_id: str, *, params: list = (), tags: list = ()) -> None:
    """`client.log_batch` in requests of at most 100 params and 100 tags (MLflow's limits per request)."""
    for i in range(0, max(len(params), len(tags)), 100):
        client.log_batch(run_id, params=params[i:i + 100], tags=tags[i:i + 100])


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
                "fastgen.recipe_path": scrub(recipe.path), "fastgen.recipe_digest": recipe.digest(),
                "fastgen.process": process_id(), **_invocation_tags(inv),
                **{k: scrub(v) for k, v in _pipeline_tags.get().items()}}).info.run_id
    end_stale_runs(client, exp, recipe.name, stage, tags.get("fastgen.params_digest"), parent)
    run = client.create_run(exp, run_name=stage, tags={
        "mlflow.parentRunId": parent, "fastgen.invocation": inv, "fastgen.level": "stage",
        "fastgen.recipe": recipe.name, "fastgen.stage": stage, "fastgen.recipe_digest": recipe.digest(),
        "fastgen.process": process_id(), **{k: scrub(v) for k, v in tags.items()}})
    rid = run.info.run_id
    from mlflow.entities import Param

    log_batches(client, rid, params=[Param(k, scrub(v)) for k, v in flatten(params).items()])
    pre = "fastgen.upstream_run."
    upstream = {k[len(pre):]: str(v) for k, v in tags.items() if k.startswith(pre) and v not in (None, "None")}
    return Tracker(client, rid, parent, uri, upstream, exp)


FAILURE_TAG = "fastgen.failure"  # why a run ended FAILED or KILLED, in one line


def end_stage_run(tr: Tracker, ok: bool, reason: str | None = None, interrupted: bool = False) -> None:
    """End the stage's run FINISHED, or FAILED (KILLED when `interrupted`: Ctrl-C, SIGTERM) with
    `reason` (one line) in tag `fastgen.failure`."""
    if tr.client:
        status = "FINISHED" if ok else "KILLED" if interrupted else "FAILED"
        if reason:
            tr.client.set_tag(tr.run_id, FAILURE_TAG, scrub(reason)[:5000])
        tr.client.set_terminated(tr.run_id, status)
        # the parent is FAILED (or KILLED) once any stage was: a later stage's success does not undo that
        if not ok or tr.client.get_run(tr.parent_id).info.status not in ("FAILED", "KILLED"):
            tr.client.set_terminated(tr.parent_id, status)


def kill_run(client, run_id: str, reason: str, keep_parent: str | None = None) -> None:
    """Mark a run whose process is gone KILLED, with `reason`; its parent too (the invocation ended
    with it), unless the parent is `keep_parent`, already ended FAILED or KILLED, or still has a
    running stage in a live process."""
    client.set_tag(run_id, FAILURE_TAG, scrub(reason)[:5000])
    client.set_terminated(run_id, "KILLED")
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent or parent == keep_parent or client.get_run(parent).info.status not in ("RUNNING", "FINISHED"):
        return
    siblings = client.search_runs([run.info.experiment_id], f"attributes.status = 'RUNNING' and "
                                                            f"tags.`mlflow.parentRunId` = '{parent}'")
    if any(not process_gone(r.data.tags.get("fastgen.process", "")) for r in siblings):
        return
    client.set_tag(parent, FAILURE_TAG, scrub(f"stage run {run_id} was killed")[:5000])
    client.set_terminated(parent, "KILLED")


def end_stale_runs(client, exp: str, recipe: str, stage: str, digest: str | None, keep_parent: str) -> list[str]:
    """Mark KILLED every run of this stage (same recipe, stage and params digest) that is still
    RUNNING although the process that opened it is gone; return their ids."""
    if not digest:
        return []
    found = client.search_runs([exp], f"attributes.status = 'RUNNING' and tags.`fastgen.recipe` = '{recipe}' and "
                                      f"tags.`fastgen.stage` = '{stage}' and tags.`fastgen.params_digest` = '{digest}'")
    stale = [r for r in found if process_gone(r.data.tags.get("fastgen.process", ""))]
    for r in stale:
        kill_run(client, r.info.run_id, f"process {r.data.tags['fastgen.process']} ended without ending this run "
                 f"(killed); found by a new run of the stage from {process_id()}", keep_parent)
    return [r.info.run_id for r in stale]


def kill_stale_run(uri: str, run_id: str, reason: str) -> bool:
    """Mark run `run_id` of the store at `uri` KILLED if it is still RUNNING (its process is known
    to be gone); return whether it was."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except Exception:  # deleted, or in a store that no longer has it
        return False
    kill_run(client, run_id, reason)
    return True


# --- credentials ---------------------------------------------------------------------------------
# Nothing logged (params, tags, dataset sources, the manifest artifact) may carry a credential. The
# environment is never logged; on top, every logged string is scrubbed of (a) the values of
# environment variables whose names say they are secrets and (b) the user:password part of URLs.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|AUTH", re.I)
# everything between `scheme://` and the token's last `@`: a user:password (whose password may hold `/` or
# `@`, as AWS secret keys and raw passwords do) or a bare token; an `@` later in a path over-redacts, harmlessly
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)(?:[^\s@]*@)+", re.I)
REDACTED = "***"


def _secret_values() -> list[str]:
    # names first, then each value if still set: another thread may unset a variable meanwhile
    # (MLflow's telemetry thread does, while a run is logged), and environ.items() would raise KeyError
    values = (os.environ.get(k) for k in list(os.environ) if _SECRET_NAME.search(k))
    return sorted({v for v in values if v is not None and len(v) >= 6}, key=len, reverse=True)


def scrub(value: str) -> str:
    """`value` with secrets from the environment and URL credentials (user:password@, token@) replaced by ***."""
    value = _URL_USERINFO.sub(rf"\g<1>{REDACTED}@", str(value))
    for s in _secret_values():
        value = value.replace(s, REDACTED)
    return value


# --- lineage ---------------------------------------------------------------------------------------
MANIFEST_ARTIFACT = "fastgen/manifest.json"
MODEL_FILES = ("model.safetensors", "model.json")


def _dataset(name: str, digest: str, source: dict, kind: str):
    """An MLflow dataset entity. Its `digest` column holds 36 characters: the full sha256 is in
    the profile (and in the `fastgen.digest` input tag)."""
    from mlflow.entities import Dataset

    return Dataset(name=name, digest=digest[:32], source_type="fastgen", source=scrub(json.dumps(source, sort_keys=True)),
                   profile=json.dumps({"sha256": digest, "kind": kind}))


def _input(dataset, context: str, digest: str):
    from mlflow.entities import DatasetInput, InputTag

    return DatasetInput(dataset, [InputTag("mlflow.data.context", context), InputTag("fastgen.digest", digest)])


def upstream_models(client, run_id: str | None) -> list[str]:
    """Ids of the LoggedModels a stage run produced."""
    if not run_id:
        return []
    try:
        outs = client.get_run(run_id).outputs
    except Exception:  # the upstream run lives in another store, or was deleted
        return []
    return [o.model_id for o in (outs.model_outputs if outs else [])]


def _log_inputs(c, run_id: str, datasets: list, models) -> None:
    """`log_inputs`, once more if another stage process registered the same dataset (same
    experiment, name and digest) between MLflow's lookup and its insert: a SQL store then refuses
    the second insert on its unique constraint, and the retry finds and links the existing one
    (two `dvc exp` experiments or sweep trials training the same stage at once)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            return c.log_inputs(run_id, datasets=datasets, models=models)
        except MlflowException as e:
            if "unique constraint" not in str(e).lower() or attempt == 2:
                raise


def log_lineage(tr: Tracker, recipe, stage: str, manifest: dict, folder: str | Path, storage_uri: str) -> None:
    """Record what a finished stage consumed and produced in its MLflow run.

    Inputs (`log_inputs`): the dataset (name, its tensors' digest, its config) and every input
    artifact — models as the upstream run's LoggedModel, others (e.g. an ODE pair set) as datasets
    with their content digest and storage URI. Output: a training stage's model becomes a
    LoggedModel of this run (`log_outputs`) holding the model files and the manifest, tagged with
    the digests and URI. The manifest itself is logged as an artifact of the run: it is what
    `fastgen lineage` reads when the files are gone. Tags: output digest and URI, input URIs.
    """
    if not tr.client:
        return
    from mlflow.entities import LoggedModelInput, LoggedModelOutput

    c, folder = tr.client, Path(folder)
    data = manifest["data"]
    datasets = [_input(_dataset(f"{data['kind']}:{data['name']}", data["digest"],
                                {k: v for k, v in data.items() if k != "digest"}, "data"), "training", data["digest"])]
    models, tags = [], {"fastgen.output_digest": manifest["digest"], "fastgen.storage_uri": storage_uri}
    for name, inp in manifest.get("inputs", {}).items():
        tags[f"fastgen.input_uri.{name}"] = inp["path"]
        ids = upstream_models(c, tr.upstream.get(name))
        if ids:
            models += [LoggedModelInput(i) for i in ids]
        else:
            datasets.append(_input(_dataset(f"{recipe.name}/{name}", inp["digest"],
                                            {"uri": inp["path"], "stage": name, "role": inp["role"]}, inp["role"]),
                                   inp["role"], inp["digest"]))
    _log_inputs(c, tr.run_id, datasets, models or None)
    tr.set_tags(tags)
    pause_point("mlflow")
    with tempfile.TemporaryDirectory() as tmp:
        man = Path(tmp) / "manifest.json"
        man.write_text(scrub(json.dumps(manifest, indent=2, sort_keys=True)))
        c.log_artifact(tr.run_id, str(man), "fastgen")
        if all((folder / f).exists() for f in MODEL_FILES):
            lm = c.create_logged_model(tr.experiment_id, name=f"{recipe.name}-{stage}", source_run_id=tr.run_id,
                                       model_type=manifest["kind"],
                                       tags={k: scrub(v) for k, v in {
                                           "fastgen.recipe": recipe.name, "fastgen.stage": stage,
                                           "fastgen.kind": manifest["kind"],
                                           "fastgen.method": (manifest["params"]["stage"].get("method") or {}).get("name"),
                                           "fastgen.output_digest": manifest["digest"],
                                           "fastgen.params_digest": manifest["params_digest"],
                                           "fastgen.data_digest": data["digest"],
                                           "fastgen.git_commit": (manifest.get("code") or {}).get("git_commit"),
                                           "fastgen.storage_uri": storage_uri}.items()})
            c.log_model_params(lm.model_id, {k: scrub(v) for k, v in flatten(manifest["params"]["stage"]).items()})
            for f in MODEL_FILES:
                c.log_model_artifact(lm.model_id, str(folder / f))
            c.log_model_artifact(lm.model_id, str(man))
            c.finalize_logged_model(lm.model_id, "READY")
            c.log_outputs(tr.run_id, [LoggedModelOutput(lm.model_id, step=0)])
            tr.set_tags({"fastgen.logged_model": lm.model_id})
    if manifest["kind"] == "evaluate":
        register_students(tr, recipe, stage, manifest, folder)


# --- model registry ---------------------------------------------------------------------------------
BEST_ALIAS = "best-1step"


def passing_students(results: dict, kinds: dict[str, str], factor: float) -> dict[str, dict]:
    """The students that pass an evaluation, with their figures (`results`: metrics.json; `kinds`:
    model stage -> method name).

    A student (method other than `edm`) passes when its primary metric's distance above the
    real-data floor at 1 NFE is at most `factor` × the teacher's at its largest NFE — or × the
    floor's spread over seeds, when the teacher is within noise of the floor. With several `edm`
    models (teacher and weak guide) the best one is the reference.
    """
    def prim(r):
        return next(m for m in ("fd", "swd") if m in r)

    def top(r):
        return r[max((k for k in r if k.startswith("nfe_")), key=lambda k: int(k[4:]))]

    teachers = [top(results[s]) for s, m in kinds.items() if m == "edm" and s in results]
    if not teachers:
        return {}
    p = prim(teachers[0])
    ref = min(t[p]["above_floor"] for t in teachers)
    scale = max(ref, max(t[p]["floor_std"] for t in teachers))
    out = {}
    for s, m in kinds.items():
        one = results.get(s, {}).get("nfe_1")
        if m == "edm" or not one:
            continue
        gap = one[p]["above_floor"]
        if gap <= factor * scale:
            out[s] = {"metric": p, "above_floor_1nfe": gap, "mean_1nfe": one[p]["mean"],
                      "teacher_above_floor": ref, "threshold": factor * scale}
    return out


def register_students(tr: Tracker, recipe, stage: str, manifest: dict, folder: str | Path) -> dict[str, str]:
    """Register the students that pass evaluation `stage` (see `passing_students`).

    Registered model `<recipe name>`: one version per passing student and evaluation, whose source
    is the student's LoggedModel (model.safetensors, model.json, manifest.json), tagged with its
    stage, method, digests, the evaluation's run, the pass figures (`eval.*`) and every metric of
    the evaluation (`metrics.<nfe_K>.<metric>`: mean over seeds); alias `best-1step` points at the
    best one of the latest evaluation. Returns stage -> version."""
    import fsspec

    factor = recipe.stages[stage].evaluate.pass_factor
    with fsspec.open(f"{folder}/metrics.json", "r") as f:
        results = json.load(f)
    c, models = tr.client, {}
    for name in manifest.get("inputs", {}):
        for mid in upstream_models(c, (tr.upstream or {}).get(name)):
            models[name] = c.get_logged_model(mid)
    kinds = {s: lm.tags.get("fastgen.method") for s, lm in models.items()}
    passing = passing_students(results, kinds, factor)
    if not passing:
        return {}
    from mlflow.exceptions import MlflowException

    reg = recipe.name
    try:
        c.create_registered_model(reg, tags={"fastgen.recipe": recipe.name},
                                  description=f"1-step students of recipe {recipe.name} that passed evaluation")
    except MlflowException:  # exists already
        pass
    versions = {}
    for s, fig in passing.items():
        lm = models[s]
        # source: the LoggedModel's artifact location, not models:/<id> (which MLflow's SQL registry
        # resolves through the process-global tracking URI, not this client's)
        mv = c.create_model_version(reg, source=lm.artifact_location, run_id=lm.source_run_id, model_id=lm.model_id,
                                    tags={"fastgen.stage": s, "fastgen.method": kinds[s], "fastgen.logged_model": lm.model_id,
                                          "fastgen.output_digest": lm.tags.get("fastgen.output_digest"),
                                          "fastgen.eval_stage": stage, "fastgen.eval_run": tr.run_id,
                                          "fastgen.eval_digest": manifest["digest"],
                                          **{f"eval.{k}": str(v) for k, v in fig.items()},
                                          **{f"metrics.{k}.{m}": str(v["mean"] if isinstance(v, dict) else v)
                                             for k, d in results[s].items() for m, v in d.items()}},
                                    description=f"{recipe.name}/{s} ({kinds[s]}), passed {recipe.name}/{stage}")
        versions[s] = mv.version
    best = min(passing, key=lambda s: passing[s]["above_floor_1nfe"])
    c.set_registered_model_alias(reg, BEST_ALIAS, versions[best])
    tr.set_tags({f"fastgen.registered.{s}": f"{reg}/{v}" for s, v in versions.items()})
    return versions
