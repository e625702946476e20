"""Where stage outputs live: a local folder or an object store (`s3://bucket/prefix`, through
fsspec/s3fs). Every artifact is `<root>/<recipe>/<stage>/` with its files and `manifest.json`.

A stage always runs into a local temporary folder. For a remote root, publishing uploads every
file and then `manifest.json` last (the commit marker; an older manifest is deleted first), so an
upload cut short leaves an artifact without a manifest, which is incomplete: consumers and
`up_to_date` refuse it. A remote input is fetched into a local cache folder named after its
manifest digest, checked file by file against that manifest, and handed to the stage as a local
folder; a cached copy is reused only while the stored objects are the ones it was fetched from
(same keys and ETags) and its files still match the manifest.

Endpoint and credentials come from the standard AWS variables or config files, read by botocore
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, ~/.aws/...);
nothing here stores or prints them. Cache: $FASTGEN_CACHE_DIR, else $XDG_CACHE_HOME/fastgen,
else ~/.cache/fastgen. An object store that cannot be used (no credentials, access denied, endpoint
unreachable) is a `StageError` of one line naming the URI and what to set, never the credentials.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from fastgen_core import artifacts
from fastgen_core.data import cache_root

from .spec import StageError
from .timing import pause_point

MANIFEST = artifacts.MANIFEST


def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def location(recipe, stage: str) -> str:
    """Where stage `stage` of `recipe` is stored: an absolute local path or a remote URI."""
    root = recipe.storage.root
    if is_remote(root):
        return f"{root.rstrip('/')}/{recipe.name}/{stage}"
    r = Path(root)
    return str((r if r.is_absolute() else Path.cwd() / r) / recipe.name / stage)



def _fs(uri: str):
    """The fsspec filesystem of `uri` and the path inside it (listing cache dropped: objects may
    have been changed by another process since the last look)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()
    return fs, path.rstrip("/")


@contextmanager
def _reaching(uri: str):
    """Turn the object store's "cannot use it at all" errors into one line naming `uri`
    (docs/remote.md lists the variables); missing objects pass through as FileNotFoundError."""
    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

    from .tracking import scrub

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise StageError(f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(or a profile in ~/.aws/credentials); see docs/remote.md") from None
    except PermissionError as e:
        if e.filename is not None:  # a local file (the cache), not the store
            raise
        raise StageError(f"{uri}: access denied by the object store ({scrub(str(e).splitlines()[0])}); "
                         "check the credentials' rights on the bucket") from None
    except BotoCoreError as e:
        raise StageError(f"{uri}: cannot use the object store: {type(e).__name__}: "
                         f"{scrub(str(e).splitlines()[0])} (AWS_ENDPOINT_URL?)") from None


def _objects(fs, path: str) -> dict[str, dict]:
    """The stored objects of an artifact: relative POSIX path -> info (size, ETag)."""
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {k[len(path) + 1:]: v for k, v in sorted(found.items()) if k.startswith(path + "/")}


def read_manifest(uri: str | Path) -> dict:
    """The manifest of a local or remote artifact (FileNotFoundError if it has none)."""
    if not is_remote(uri):
        return artifacts.read_manifest(uri)
    with _reaching(str(uri)):
        fs, path = _fs(str(uri))
        return artifacts.parse_manifest(fs.cat_file(f"{path}/{MANIFEST}"), str(uri))


def _remote_manifest(uri: str, fs, path: str) -> dict:
    try:
        return artifacts.parse_manifest(fs.cat_file(f"{path}/{MANIFEST}"), uri)
    except FileNotFoundError:
        raise artifacts.DigestMismatch(f"{uri}: no {MANIFEST} (incomplete or foreign artifact)") from None


def _check(uri: str, manifest: dict, files: dict[str, str]) -> None:
    bad = sorted(k for k in set(files) | set(manifest["files"]) if files.get(k) != manifest["files"].get(k))
    if bad:
        raise artifacts.DigestMismatch(f"{uri}: content does not match its manifest: {', '.join(bad)}")


def verify(uri: str | Path) -> dict:
    """Check an artifact against its manifest by recomputing every file's sha256 (a remote one
    by streaming its objects, nothing kept); return the manifest or raise DigestMismatch."""
    if not is_remote(uri):
        return artifacts.verify(uri)
    with _reaching(str(uri)):
        uri = str(uri)
        fs, path = _fs(uri)
        m = _remote_manifest(uri, fs, path)
        files = {}
        for rel in _objects(fs, path):
            if rel in artifacts.NOT_CONTENT:
                continue
            h = hashlib.sha256()
            with fs.open(f"{path}/{rel}", "rb", block_size=1 << 22) as f:
                while b := f.read(1 << 20):
                    h.update(b)
            files[rel] = h.hexdigest()
        _check(uri, m, files)
        return m


def _store() -> Path:
    """The cache of fetched (or published) remote artifacts: one folder per manifest digest."""
    return cache_root() / "artifacts"


def local_copy(uri: str | Path, digest: str) -> Path:
    """The local folder holding the files of the artifact with `digest` stored at `uri`: the
    artifact itself when stored locally, its cache entry when remote (after `fetch` or `output`)."""
    return _store() / digest if is_remote(uri) else Path(uri)


def _stamp(objects: dict[str, dict]) -> dict[str, list]:
    """What identifies the stored objects a cached copy was made from: key, size and ETag."""
    return {k: [v.get("size"), v.get("ETag")] for k, v in objects.items()}


def _stamp_file(digest: str, uri: str) -> Path:
    return _store() / f"{digest}.{hashlib.sha256(uri.encode()).hexdigest()[:16]}.json"


def _valid(folder: Path, digest: str) -> bool:
    try:
        return artifacts.verify(folder)["digest"] == digest
    except (OSError, ValueError, artifacts.DigestMismatch):
        return False


def fetch(uri: str | Path) -> tuple[Path, dict]:
    """A verified local copy of an artifact and its manifest. Local artifacts are verified in place;
    remote ones are downloaded into the cache (or reused from it, see the module docstring)."""
    if not is_remote(uri):
        return Path(uri), artifacts.verify(uri)
    with _reaching(str(uri)):
        uri = str(uri)
        fs, path = _fs(uri)
        m = _remote_manifest(uri, fs, path)
        objects = _objects(fs, path)
        store = _store()
        dest = local_copy(uri, m["digest"])
        try:
            if json.loads(_stamp_file(m["digest"], uri).read_text()) == _stamp(objects) and _valid(dest, m["digest"]):
                return dest, m
        except (OSError, ValueError):
            pass
        store.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=store))
        try:
            for rel in objects:
                if rel not in artifacts.NOT_CONTENT:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f"{path}/{rel}", str(tmp / rel))
            _check(uri, m, artifacts.digest_files(tmp))
            (tmp / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))
            _install(tmp, m["digest"], uri, objects)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest, m


def _install(tmp: Path, digest: str, uri: str, objects: dict[str, dict]) -> None:
    """Make the verified folder `tmp` the cache entry of `digest`, unless a valid one is there
    already (same content: another pipeline or a concurrent fetch made it), and remember which
    stored objects at `uri` it stands for."""
    dest = _store() / digest
    if not _valid(dest, digest):
        old = dest.with_name(f".old-{uuid.uuid4().hex[:8]}")
        try:
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
        except OSError:
            pass  # a concurrent fetch installed it first
        shutil.rmtree(old, ignore_errors=True)
    stamp = _stamp_file(digest, uri)
    part = stamp.with_name(f".{stamp.name}.{uuid.uuid4().hex[:8]}")
    part.write_text(json.dumps(_stamp(objects)))
    os.replace(part, stamp)


def publish(folder: str | Path, uri: str) -> None:
    """Upload a finished artifact folder (with its manifest) to `uri`, manifest last."""
    with _reaching(str(uri)):
        folder = Path(folder)
        fs, path = _fs(uri)
        if fs.exists(f"{path}/{MANIFEST}"):
            fs.rm_file(f"{path}/{MANIFEST}")  # from here on the old artifact is incomplete
        old = set(_objects(fs, path))
        new = sorted(artifacts.digest_files(folder))
        for i, rel in enumerate(new):
            fs.put_file(str(folder / rel), f"{path}/{rel}")
            if i == 0:
                pause_point("upload")  # tests only: an upload cut short (stages/timing.py)
        stale = sorted(old - set(new) - {MANIFEST})
        if stale:
            fs.rm([f"{path}/{rel}" for rel in stale])
        fs.put_file(str(folder / MANIFEST), f"{path}/{MANIFEST}")


@contextmanager
def output(uri: str):
    """Yield a fresh local folder for a stage's output. On success: a local `uri` is replaced by
    it atomically; a remote one receives it through `publish` and the folder becomes the cache
    entry of its digest. On failure before `publish`, nothing is written at `uri`; an upload cut
    short leaves `uri` without its manifest (removed first), which every consumer refuses."""
    if not is_remote(uri):
        with artifacts.atomic_dir(uri) as tmp:
            yield tmp
        return
    store = _store()
    store.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".out-", dir=store))
    try:
        yield tmp
        publish(tmp, uri)
        with _reaching(str(uri)):
            fs, path = _fs(uri)
            _install(tmp, artifacts.read_manifest(tmp)["digest"], uri, _objects(fs, path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove(uri: str) -> None:
    """Delete a folder (local or remote) if it exists."""
    if not is_remote(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    with _reaching(uri):
        fs, path = _fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
