"""What every stage shares: resolve inputs (verified against their manifests), skip when up to
date, run into a temporary folder, write the manifest last, rename into place, track in MLflow.

`run_stage(recipe, name)` is the one entry point: the CLI (`python -m stages.run`), `dvc repro`,
the Prefect flow and the tests all call it. In a sweep's trials (`$FASTGEN_REUSE_DIR`), a stage that
another trial already made from the same params and inputs is copied, not rerun (stages/reuse.py).

One process at a time runs a stage into its output (`stage_lock`: an exclusive `flock` on
`<stage>.lock` next to the stage's partial checkpoints); another run of the same stage waits for it,
says so, and then usually finds the output up to date. The lock file also records the attempt
holding it (its process and MLflow run) and is deleted when the attempt ends, failed or not: a lock
file found with a run in it was left by an attempt that was killed. That run is marked KILLED, and
if the attempt got as far as publishing its output (its manifest names that run) the stage runs
again, so that every output's MLflow run holds its complete lineage.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen_core import artifacts
from fastgen_core.data import cached_data

from . import reuse, storage, tracking
from .recipe import Recipe, RecipeError, load_recipe
from .spec import StageError, stage_names
from .timing import TIMING_PREFIX, phase, recording, sub_phases

__all__ = ["PROJECT", "TIMING_PREFIX", "StageError", "run_stage", "stage_dir", "main"]

PROJECT = Path(__file__).resolve().parent.parent


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        return round(time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK")), 3)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _print_timing(recipe: Recipe, stage: str, t_entry: float, age: float | None, phases: dict,
                  total: float, skipped: bool) -> None:
    rec = {"recipe": recipe.name, "stage": stage, "kind": recipe.stages[stage].kind,
           "backend": recipe.compute.backend, "skipped": skipped, "t_entry": round(t_entry, 3),
           "process_age_at_entry_s": age, "total_s": round(total, 4),
           "phases": {k: round(v, 4) for k, v in phases.items()}}
    print(f"{TIMING_PREFIX} {json.dumps(rec)}", file=sys.stderr, flush=True)


def stage_dir(recipe: Recipe, stage: str) -> Path:
    """The local folder of a stage's output (for a local storage root; see storage.location)."""
    return Path(storage.location(recipe, stage))


@dataclass
class Input:
    stage: str
    path: Path                                 # a verified local copy (the artifact itself when stored locally)
    manifest: dict
    uri: str = ""                              # where it is stored: local path or s3://...


@dataclass
class StageContext:
    recipe: Recipe
    name: str
    out: Path                                  # temporary output folder; renamed into place on success
    inputs: dict[str, list[Input]]             # role -> inputs (one for str roles, several for lists)
    tracker: tracking.Tracker
    metrics: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)  # speeds measured by the stage (manifest `timing`: not content)

    @property
    def spec(self):
        return self.recipe.stages[self.name]

    def input(self, role: str) -> Input:
        if role not in self.inputs:
            raise StageError(f"{self.recipe.path}: stages.{self.name}.inputs.{role}: this {self.spec.kind} stage needs it")
        return self.inputs[role][0]

    @property
    def device(self) -> torch.device:
        use = self.recipe.compute.use_gpu and torch.cuda.is_available()
        return torch.device("cuda" if use else "cpu")

    def partial_dir(self) -> Path:
        """Where resumable checkpoints survive a crash: keyed by the stage's params digest."""
        return partial_root(self.recipe, self.name) / f"{self.name}-{self.recipe.digest(self.name)[:16]}"


def partial_root(recipe: Recipe, stage: str) -> Path:
    """The folder of a recipe's partial checkpoints and stage locks: next to the outputs, or in the
    local cache when they are stored remotely."""
    if storage.is_remote(recipe.storage.root):
        return storage.cache_root() / "partial" / recipe.name
    return stage_dir(recipe, stage).parent / ".partial"


@dataclass
class Lock:
    fd: int
    path: Path
    left: dict                                 # what the previous holder recorded, if it was killed
    facts: dict = field(default_factory=dict)  # what this holder recorded

    def record(self, **facts) -> None:
        """Add facts about the attempt holding the lock to the lock file."""
        self.facts.update(facts)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.facts).encode(), 0)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"process {h['pid']} (since {h['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire(path: Path, what: str) -> int:
    """An exclusive flock on `path`, waiting (and saying so) while another process holds it. The
    holder deletes the file on release, so a lock won on a file no longer at `path` is retried."""
    said = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. storage.root under a read-only or virtual file system
            raise StageError(f"{what}: cannot create {path.parent}: {e.strerror or e}") from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # it records the tracking URI
        except FileNotFoundError:  # the folder was removed by a releasing holder: again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                print(f"[fastgen] {what}: {_holder(path)} is running this stage; waiting for it to finish",
                      file=sys.stderr, flush=True)
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def stage_lock(recipe: Recipe, stage: str):
    """Hold the lock of `stage`'s output for the block (see the module docstring); yields a `Lock`
    whose `left` is what a killed earlier attempt recorded ({} if none)."""
    path = partial_root(recipe, stage) / f"{stage}.lock"
    with phase("lock"):
        fd = _acquire(path, f"{recipe.name}/{stage}")
    try:
        raw = os.pread(fd, 1 << 16, 0)
        try:
            left = json.loads(raw) if raw else {}
        except ValueError:
            left = {}
        lock = Lock(fd, path, left if isinstance(left, dict) else {})
        lock.record(pid=os.getpid(), process=tracking.process_id(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        yield lock
    finally:
        os.unlink(path)  # still holding it: a waiter that wins the old file sees it is gone and retries
        os.close(fd)
        folders = [path.parent] + ([path.parent.parent] if storage.is_remote(recipe.storage.root) else [])
        for folder in folders:  # the recipe's folder of locks; for a remote root the cache's `partial` too
            try:
                folder.rmdir()
            except OSError:
                break


def _end_killed_attempt(lock: Lock, recipe: Recipe, stage: str) -> str | None:
    """Mark KILLED the MLflow run of an attempt that was killed while holding the lock, and remove
    the temporary folders it left next to the output (`artifacts.remove_leftovers`);
    return that run's id."""
    run_id = lock.left.get("run_id")
    if run_id and lock.left.get("tracking_uri"):
        tracking.kill_stale_run(lock.left["tracking_uri"], run_id,
                                f"process {lock.left.get('process')} was killed while running stage {stage!r}; "
                                f"found by {tracking.process_id()}")
    if lock.left and not storage.is_remote(recipe.storage.root):
        artifacts.remove_leftovers(stage_dir(recipe, stage))
    return run_id


def resolve_inputs(recipe: Recipe, stage: str) -> dict[str, list[Input]]:
    """Each input artifact, checked against its manifest (refuses missing or altered ones)."""
    out: dict[str, list[Input]] = {}
    for role, names in recipe.stages[stage].inputs.items():
        for up in stage_names(names):
            uri = storage.location(recipe, up)
            try:
                p, m = storage.fetch(uri)
            except artifacts.DigestMismatch as e:
                raise StageError(f"stage {stage!r} refuses input {role!r} from stage {up!r}: {e}") from None
            out.setdefault(role, []).append(Input(up, p, m, uri))
    return out


def up_to_date(recipe: Recipe, stage: str, inputs: dict[str, list[Input]]) -> dict | None:
    """The existing manifest if the output was made from these params and inputs, else None."""
    try:
        m = storage.fetch(storage.location(recipe, stage))[1]
    except (artifacts.DigestMismatch, FileNotFoundError, ValueError):
        return None
    return m if reuse.made_from(m, recipe, stage, inputs) else None


def run_stage(recipe: Recipe | str, stage: str, force: bool = False) -> dict:
    """Run one stage of a recipe (if not up to date) and return its manifest."""
    t_entry, p0, age = time.time(), time.perf_counter(), process_age()
    with recording() as phases:
        with phase("recipe"):
            if not isinstance(recipe, Recipe):
                recipe = load_recipe(recipe)
        if stage not in recipe.stages:
            raise StageError(f"{recipe.path}: stages: no stage named {stage!r} (have: {', '.join(recipe.stages)})")
        manifest, skipped = _run_stage(recipe, stage, force)
        _print_timing(recipe, stage, t_entry, age, phases, time.perf_counter() - p0, skipped)
        return manifest


def _run_stage(recipe: Recipe, stage: str, force: bool) -> tuple[dict, bool]:
    if recipe.compute.threads:
        torch.set_num_threads(recipe.compute.threads)
    with phase("inputs"):
        inputs = resolve_inputs(recipe, stage)
    with stage_lock(recipe, stage) as lock:
        with phase("inputs"):
            killed = _end_killed_attempt(lock, recipe, stage)
            m = None if force else up_to_date(recipe, stage, inputs)
        if m and killed and (m.get("mlflow") or {}).get("run_id") == killed:
            print(f"[fastgen] {recipe.name}/{stage}: the output is complete but the attempt that made it was killed "
                  f"while logging to MLflow (run {killed}, now KILLED): running the stage again", file=sys.stderr)
            m = None
        if m:
            print(f"[fastgen] {recipe.name}/{stage}: up to date", file=sys.stderr)
            return m, True
        with reuse.shared(recipe, stage, inputs) as found:  # a sweep's trials share identical stages
            if found and not force:
                with phase("inputs"):
                    return reuse.adopt(found, recipe, stage), True
            m = _execute(recipe, stage, inputs, lock)
            reuse.record(recipe, stage, inputs)
            return m, False


def _one_line(e: BaseException) -> str:
    """An exception as one line: a StageError's own message, else its type and first line."""
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (SIGINT)"
    text = str(e).strip().splitlines()
    return text[0] if isinstance(e, StageError) and text else f"{type(e).__name__}: {text[0] if text else ''}"


def _execute(recipe: Recipe, stage: str, inputs: dict[str, list[Input]], lock: Lock) -> dict:
    """Run the stage into a temporary folder, write its manifest, publish it and track it."""
    spec = recipe.stages[stage]
    with phase("import"):
        module = importlib.import_module(f"stages.{recipe.module_of(stage)}")
    t0 = time.time()
    params = recipe.stage_params(stage)
    with phase("git"):
        code = artifacts.git_commit(PROJECT)
    with phase("data"):
        ds = cached_data(recipe.data)
        data_digest = artifacts.tensors_digest(ds.x, ds.y, ds.x_test, ds.y_test)
    loc = storage.location(recipe, stage)  # where the output is stored: a local folder or s3://...
    tags = {"fastgen.kind": spec.kind, "fastgen.params_digest": recipe.digest(stage),
            "fastgen.dvc_stage": f"{recipe.name}-{stage}", "fastgen.git_commit": code["git_commit"],
            "fastgen.output": loc, "fastgen.data_digest": data_digest,
            **{f"fastgen.input.{i.stage}": i.manifest["digest"] for ins in inputs.values() for i in ins},
            **{f"fastgen.upstream_run.{i.stage}": (i.manifest.get("mlflow") or {}).get("run_id")
               for ins in inputs.values() for i in ins}}
    with phase("mlflow_setup"):
        tr = tracking.start_stage_run(recipe, stage, params, tags)
    if tr.run_id:
        lock.record(run_id=tr.run_id, parent_id=tr.parent_id, tracking_uri=tr.uri)
    ok, reason, interrupted = False, None, False
    try:
        with storage.output(loc) as tmp:
            ctx = StageContext(recipe, stage, tmp, inputs, tr)
            with phase("run"), sub_phases("run"):
                module.run(ctx)
            with phase("manifest"):
                manifest = artifacts.write_manifest(tmp, {
                    "recipe": recipe.name, "recipe_path": recipe.path, "stage": stage, "kind": spec.kind,
                    "params_digest": recipe.digest(stage), "params": params,
                    "location": loc,
                    "inputs": {i.stage: {"role": role, "digest": i.manifest["digest"], "path": i.uri}
                               for role, ins in inputs.items() for i in ins},
                    "data": {"digest": data_digest, **recipe.data.model_dump(mode="json")},
                    "code": code, "metrics": ctx.metrics, "timing": ctx.timing,
                    "mlflow": {"run_id": tr.run_id, "parent_run_id": tr.parent_id} if tr.run_id else None,
                    "wall_s": round(time.time() - t0, 3),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                })
        with phase("mlflow_end"):
            tracking.log_lineage(tr, recipe, stage, manifest, storage.local_copy(loc, manifest["digest"]), loc)
        ok = True
    except BaseException as e:
        reason, interrupted = _one_line(e), isinstance(e, (KeyboardInterrupt, Terminated))
        raise
    finally:
        with phase("mlflow_end"):
            tracking.end_stage_run(tr, ok, reason, interrupted)
    print(f"[fastgen] {recipe.name}/{stage}: done in {time.time() - t0:.1f}s", file=sys.stderr)
    return manifest


class Terminated(SystemExit):
    """SIGTERM, raised so that the stage ends its run (KILLED) and releases its lock on the way out."""


def _terminate(signum, frame):
    raise Terminated(128 + signum)


def main(argv: list[str] | None = None, prog: str = "python -m stages.run") -> int:
    """CLI: python -m stages.run RECIPE.yaml STAGE [--force]."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__)
    ap.add_argument("recipe", help="recipe YAML file in params/")
    ap.add_argument("stage", help="stage name in the recipe")
    ap.add_argument("--force", action="store_true", help="run even if the output is up to date")
    a = ap.parse_args(argv)
    own = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminate) if own else None
    try:
        recipe = load_recipe(a.recipe)
        if a.stage not in recipe.stages:
            raise StageError(f"{a.recipe}: stages: no stage named {a.stage!r} (have: {', '.join(recipe.stages)})")
        run_stage(recipe, a.stage, force=a.force)
    except RecipeError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    except (StageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"error: {a.recipe}: stage {a.stage!r} terminated (SIGTERM)", file=sys.stderr)
        return e.code
    finally:
        if own:
            signal.signal(signal.SIGTERM, before)
    return 0
