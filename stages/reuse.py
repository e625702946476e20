"""Stages shared by several runs — the trials of a sweep — computed once and reused by digest.

A stage's output is determined by its params digest and its inputs' digests (that is how
`runtime.up_to_date` judges an output current). When `$FASTGEN_REUSE_DIR` names a folder (the sweep
sets it for its trials), a stage that is not up to date at its own location first takes the
exclusive lock of that key in the folder: if another run already made an output with the same
key, its files are checked against their manifest and copied (hard links for local storage) to
this run's location instead of running the stage again; otherwise the stage runs and its location
is recorded under the key. Trials running at the same time wait for the one computing a shared
stage (the teacher) and then reuse it, so it is computed once per sweep, not once per trial.

Without the variable nothing changes: `dvc repro` and single flow runs never reuse across roots.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from fastgen_core import artifacts

from . import storage

ENV = "FASTGEN_REUSE_DIR"


def input_digests(inputs: dict) -> dict[str, str]:
    """Upstream stage -> content digest of its output, for a stage's resolved inputs."""
    return {i.stage: i.manifest["digest"] for ins in inputs.values() for i in ins}


def key(recipe, stage: str, inputs: dict) -> str:
    """The params digest of `stage` and the content digests of its inputs, as one digest."""
    return hashlib.sha256(json.dumps({"params": recipe.digest(stage), "inputs": input_digests(inputs)},
                                     sort_keys=True).encode()).hexdigest()


def made_from(m: dict, recipe, stage: str, inputs: dict) -> bool:
    """Whether the output of manifest `m` was made from these params and these inputs."""
    have = {k: v["digest"] for k, v in m.get("inputs", {}).items()}
    return m.get("params_digest") == recipe.digest(stage) and input_digests(inputs) == have


@contextmanager
def shared(recipe, stage: str, inputs: dict):
    """Hold the key's lock for the block; yield the location of an earlier output with this key
    (still there and verified), or None (the caller runs the stage and calls `record`)."""
    folder = os.environ.get(ENV)
    if not folder:
        yield None
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k = key(recipe, stage, inputs)
    fd = os.open(folder / f"{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        found = None
        try:
            loc = json.loads((folder / f"{k}.json").read_text())["location"]
            if loc != storage.location(recipe, stage) and made_from(storage.read_manifest(loc), recipe, stage, inputs):
                found = loc
        except (OSError, ValueError, KeyError):
            pass
        yield found
    finally:
        os.close(fd)  # releases the lock


def record(recipe, stage: str, inputs: dict) -> None:
    """Record this run's output of `stage` as the one to reuse for its key (call under `shared`)."""
    folder = os.environ.get(ENV)
    if folder:
        k = key(recipe, stage, inputs)
        tmp = Path(folder) / f".{k}.json.{os.getpid()}"
        tmp.write_text(json.dumps({"location": storage.location(recipe, stage), "stage": stage,
                                   "recipe": recipe.name}))
        os.replace(tmp, Path(folder) / f"{k}.json")


def adopt(src: str, recipe, stage: str) -> dict:
    """Copy the verified output at `src` (its manifest included, unchanged) to `stage`'s location;
    return the manifest."""
    path, m = storage.fetch(src)  # checked file by file against its manifest
    with storage.output(storage.location(recipe, stage)) as tmp:
        for f in [*m["files"], artifacts.MANIFEST]:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path / f, tmp / f)
            except OSError:  # another file system
                shutil.copy2(path / f, tmp / f)
    print(f"[fastgen] {recipe.name}/{stage}: reused the identical output of {src} (same params and inputs)",
          file=sys.stderr)
    return m
