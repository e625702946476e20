"""Artifact manifests and content digests.

Every stage output is a folder holding its files and a `manifest.json` written last:
content digests (sha256 per file and one over them all), the params digest, the digests of its
inputs, the code version and the MLflow run id. A consumer checks an input's files against its
manifest before using it, so a changed or truncated artifact is refused, never silently used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"


class DigestMismatch(Exception):
    """An artifact's files differ from what its manifest records."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# Not content: the manifest itself, and the .gitignore `dvc repro` writes into an artifact folder
# whose files are separate DVC outputs (the evaluation's samples/, plots/, ...).
NOT_CONTENT = {MANIFEST, ".gitignore"}


def digest_files(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX paths), except the manifest."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in NOT_CONTENT}


def combine(files: dict[str, str]) -> str:
    """One digest over a folder's (path, digest) pairs."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def tensors_digest(*tensors) -> str:
    """Content digest of tensors (shape, dtype and bytes), e.g. a dataset's train/test arrays."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy())  # the buffer itself (contiguous), not a bytes copy of it
    return h.hexdigest()


def git_commit(cwd: str | Path | None = None) -> dict:
    """The code version: commit hash and whether the work tree had uncommitted changes. Outside a git
    work tree (the project image, infra/Dockerfile), the build's `FASTGEN_GIT_COMMIT` and
    `FASTGEN_GIT_DIRTY` ("0"/"1") variables; None where neither says."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True, timeout=10)
        commit = run("rev-parse", "HEAD").stdout.strip() or None
        dirty = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    if commit is None and os.environ.get("FASTGEN_GIT_COMMIT"):
        commit, flag = os.environ["FASTGEN_GIT_COMMIT"], os.environ.get("FASTGEN_GIT_DIRTY")
        dirty = {"0": False, "1": True}.get(flag)
    return {"git_commit": commit, "dirty": dirty}


def parse_manifest(text: str | bytes, where: str) -> dict:
    """A manifest's JSON, or DigestMismatch naming `where` when it is not one (consumers refuse it)."""
    try:
        m = json.loads(text)
    except ValueError:
        raise DigestMismatch(f"{where}: {MANIFEST} is not valid JSON (incomplete or foreign artifact)") from None
    if not (isinstance(m, dict) and isinstance(m.get("files"), dict) and isinstance(m.get("digest"), str)):
        raise DigestMismatch(f"{where}: {MANIFEST} is not a fastgen manifest (no files and digest)")
    return m


def read_manifest(folder: str | Path) -> dict:
    return parse_manifest((Path(folder) / MANIFEST).read_text(), str(folder))


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Digest the folder's files into `manifest` and write it (atomically) as the last file."""
    files = digest_files(folder)
    manifest = {**manifest, "files": files, "digest": combine(files)}
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, Path(folder) / MANIFEST)
    return manifest


def verify(folder: str | Path) -> dict:
    """Check a folder against its manifest; return the manifest or raise DigestMismatch."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise DigestMismatch(f"{folder}: no {MANIFEST} (incomplete or foreign artifact)")
    m = read_manifest(folder)
    files = digest_files(folder)
    bad = sorted(k for k in set(files) | set(m["files"]) if files.get(k) != m["files"].get(k))
    if bad:
        raise DigestMismatch(f"{folder}: content does not match its manifest: {', '.join(bad)}")
    return m


_TMP, _OLD = "tmp", "old"  # atomic_dir's temporary folders: .<name>.tmp-* (being written), .<name>.old-*


def remove_leftovers(final: str | Path) -> None:
    """Delete the temporary folders a killed `atomic_dir(final)` left next to `final`."""
    final = Path(final)
    for kind in (_TMP, _OLD):
        for left in final.parent.glob(f".{final.name}.{kind}-*"):
            shutil.rmtree(left, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a fresh temporary folder next to `final`; on success replace `final` with it,
    on failure delete it and leave `final` untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{_TMP}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.{_OLD}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
