"""The recipe schema: one YAML file in `params/` declares a whole pipeline.

A recipe names its data, its noise process, its stages (each with a kind, its inputs by the name of
the stage that produced them, and its kind's own settings), its compute and its tracking/storage.
Every field is typed, described and defaulted (docs/recipes.md is generated from these models).
`load_recipe(path)` validates everything once, up front — the structure, each stage's settings
against its kind's `Spec` (one union keyed by `kind`, each method's settings against its `Config`
in one union keyed by `name`), the stage graph (missing inputs, cycles, inputs of the wrong kind)
and data paths — and raises `RecipeError` with one line per problem, each naming the file and the
field path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from fastgen_core.config import SEED_MAX, DataConfig, FieldError, Strict
from fastgen_core.data import IMAGE_SOURCES, TOY_DENSITIES
from fastgen_core.methods import available_methods
from fastgen_core.noise import PROCESSES, NoiseProcess

from . import edit, evaluate, ode_pairs, progressive, reflow, students, train, weak_snapshot
from .spec import Problem, stage_names
from .tracking import scrub, tracking_uri

# the stage modules and the kinds each runs (a kind's settings are its module's `Spec`)
MODULES = (train, weak_snapshot, ode_pairs, evaluate, edit, reflow, progressive, students)
MODULE_OF_KIND = {k: m.__name__.rsplit(".", 1)[1] for m in MODULES
                  for k in m.Spec.model_fields["kind"].annotation.__args__}
STAGE_KINDS = tuple(MODULE_OF_KIND)
StageSpec = Annotated[Union[tuple(m.Spec for m in MODULES)], Field(discriminator="kind")]  # noqa: UP007


class RecipeError(Exception):
    """A recipe that cannot run. `.problems` holds one 'file: field.path: message' line each."""

    def __init__(self, problems: list[str]):
        self.problems = [" ".join(p.split()) for p in problems]  # one line each, whatever a message held
        super().__init__("\n".join(self.problems))


class ComputeConfig(Strict):
    backend: Literal["local", "ray"] = Field("local", description="local: in-process; ray: Ray Train TorchTrainer")
    num_workers: int = Field(1, gt=0, description="ray: number of training workers (local: 1)")
    use_gpu: bool = Field(False, description="ray: one GPU per worker; local: use CUDA if available")
    cpus_per_worker: int = Field(1, gt=0, description="ray: CPUs reserved per worker (local: 1)")
    threads: int | None = Field(
        None, gt=0, description="CPU threads per process/worker for torch (None: torch's default). Small "
        "models on a shared CPU run fastest with 1: two threads contending with other jobs can be 10-100x slower")

    @model_validator(mode="after")
    def _ray_only(self):
        for field in ("num_workers", "cpus_per_worker"):
            if self.backend == "local" and getattr(self, field) != 1:
                raise FieldError(field, f"applies to backend ray (backend local runs in this one process): "
                                 f"set backend: ray, or remove {field}")
        return self


# MLflow's tracking stores: a REST server, a SQLAlchemy database, a local folder
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
# Where stage outputs can live: a local folder, an object store, fsspec's in-process store (tests)
STORAGE_SCHEMES = ("s3", "memory")


def scheme_of(uri: str) -> str | None:
    """The scheme of a URI (`s3` of s3://…, `postgresql` of postgresql+psycopg2://…), or None for
    a plain path."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    return m.group(1).split("+", 1)[0].lower() if m else None


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow could not use `uri` as its tracking store (None: it can)."""
    scheme = scheme_of(uri)
    if scheme is None:
        return None
    if scheme not in TRACKING_SCHEMES:
        return f"unsupported MLflow tracking URI scheme {scheme!r} (supported: {', '.join(TRACKING_SCHEMES)})"
    if scheme in ("http", "https") and not urlsplit(uri).netloc:
        return f"{scrub(uri)!r} names no server (http://host:port)"  # an http(s) URI may carry user:password@
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or uri == "sqlite:///"):
        return f"{uri!r}: a SQLite store is sqlite:///relative/path.db or sqlite:////absolute/path.db"
    return None


class TrackingConfig(Strict):
    uri: str | None = Field(None, min_length=1, description="MLflow tracking URI (http(s)://, sqlite:///, "
                            "postgresql://, …); default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project")
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment name; default: the recipe name")
    enabled: bool = Field(True, description="log runs to MLflow")

    @field_validator("uri")
    @classmethod
    def _store(cls, v):
        why = v and tracking_uri_problem(v)
        if why:
            raise ValueError(why)
        return v


class StorageConfig(Strict):
    root: str = Field("outputs", min_length=1, description="where stage outputs go: a local folder (relative to the "
                      "project) or s3://bucket/prefix")

    @field_validator("root")
    @classmethod
    def _supported(cls, v: str):
        scheme = scheme_of(v)
        if scheme is not None and scheme not in STORAGE_SCHEMES:
            raise ValueError(f"unsupported storage scheme {scheme!r}: a local folder, or s3://bucket/prefix"
                             + (" (a local folder is written as a plain path)" if scheme == "file" else ""))
        if scheme is not None and not v.partition("://")[2].strip("/"):
            raise ValueError(f"{v!r} names no bucket: write {scheme}://bucket/prefix")
        return v


class Recipe(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_]+$", description="recipe name: output folder and DVC stage prefix")
    description: str = Field("", description="free text")
    seed: int = Field(0, ge=0, lt=SEED_MAX, description="global seed (0..2^32 − 1)")
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset")
    noise: NoiseProcess = Field(default_factory=lambda: PROCESSES["edm"](), description=(
        "the noise process of every stage (a training stage may set its own `noise`); `process` picks it: "
        f"{' | '.join(PROCESSES)} (default edm)"))
    stages: dict[str, StageSpec] = Field(..., min_length=1, description="named stages (names: letters, digits, _); "
                                         "inputs refer to these names")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="where training runs")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="artifact storage")

    _path: str = PrivateAttr("<recipe>")  # set by load_recipe, not part of the YAML
    _groups: dict[str, list[str]] = PrivateAttr(default_factory=dict)  # set by expand_groups
    _declarations: dict[str, Any] = PrivateAttr(default_factory=dict)  # group name -> its own Spec

    @property
    def groups(self) -> dict[str, list[str]]:
        """Each group declaration (K students, R rounds) -> the names of the stages it expanded
        into, in order; the last carries the group's name."""
        return self._groups

    def declared_as(self, stage: str) -> str:
        """The key under `stages:` in the YAML that declares `stage` (a group member: its group's)."""
        return next((g for g, members in self._groups.items() if stage in members), stage)

    @property
    def path(self) -> str:
        """The file the recipe was read from (error messages and manifests name it)."""
        return self._path

    def at(self, path: str) -> "Recipe":
        """This recipe, told that it was read from `path`."""
        self._path = path
        return self

    def module_of(self, stage: str) -> str:
        """The stage module that runs `stage` (`stages/<module>.py`)."""
        return MODULE_OF_KIND[self.stages[stage].kind]

    def group_module(self, stage: str) -> str | None:
        """The stage module of the group declaration `stage` was expanded from (None: not a member)."""
        group = self.declared_as(stage)
        return MODULE_OF_KIND[self._declarations[group].kind] if group in self._declarations else None

    def noise_of(self, stage: str):
        """The noise process a stage trains in: its own `noise`, else the recipe's."""
        return getattr(self.stages[stage], "noise", None) or self.noise

    def model_method(self, stage: str, seen: tuple = ()) -> str | None:
        """The method `stage`'s saved model samples with (a snapshot guide: its teacher's); None if
        the stage makes no model or does not exist."""
        st = self.stages.get(stage)
        return None if st is None or stage in seen else st.model_method(self, seen + (stage,))

    def upstream(self, stage: str) -> list[str]:
        """Names of the stages `stage` consumes, in declaration order, without repeats."""
        out: list[str] = []
        for v in self.stages[stage].inputs.values():
            for name in stage_names(v):
                if name not in out:
                    out.append(name)
        return out

    def order(self, targets: list[str] | None = None) -> list[str]:
        """Stages in a topological order (the recipe is validated acyclic): all of them, or `targets`
        and every stage upstream of them."""
        done: list[str] = []

        def visit(s: str):
            if s not in done:
                for u in self.upstream(s):
                    visit(u)
                done.append(s)

        for s in targets or self.stages:
            visit(s)
        return done

    def stage_params(self, stage: str) -> dict:
        """Everything that determines a stage's outputs besides its inputs: the seed, the data, the
        stage's noise process and its own kind's settings (nothing of other kinds). Hashed into its
        manifest as the params digest."""
        return {"seed": self.seed, "data": self.data.model_dump(mode="json"),
                "noise": self.noise_of(stage).model_dump(mode="json"),
                "stage": self.stages[stage].model_dump(mode="json")}

    def digest(self, stage: str | None = None) -> str:
        payload = self.stage_params(stage) if stage else self.model_dump(mode="json")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- validation -----------------------------------------------------------------------------------

# stage names become folders, DVC stage names and MLflow run names; fullmatch (`$` lets a final newline through)
NAME = re.compile(r"[A-Za-z0-9_]+")
MAX_NODES = 100_000  # a recipe is small; more nodes after expanding YAML aliases is an alias bomb


def _loc(loc: tuple, raw: Any) -> str:
    """A pydantic error location as a field path of the YAML. Entering a union member, pydantic
    inserts its tag (a stage's kind, a method's name, a noise process) or, for a plain union, the
    member's type (`str`, `list[str]`) into the location; those are dropped, as they are not keys
    of the file."""
    out, node, entered = [], raw, False
    for p in loc:
        if entered and isinstance(node, dict) and p in _tags_of(node):
            entered = False
            continue
        if isinstance(p, str) and node is not None and not isinstance(node, dict):
            continue  # a plain union's member type, inside a scalar or a list
        out.append(str(p))
        node = node.get(p) if isinstance(node, dict) else (
            node[p] if isinstance(node, list) and isinstance(p, int) and p < len(node) else None)
        entered = True
    return ".".join(out) or "<root>"


def _tags_of(node: dict) -> set:
    """The union tags pydantic may insert on entering this mapping."""
    tags = {v for k in ("kind", "name", "process") if isinstance(v := node.get(k), str)}
    return tags if tags else {"edm"}  # an untagged noise mapping is the EDM process


def _message(err: dict) -> tuple[str, str]:
    """(extra path, message) for a pydantic error; union-tag errors name what is known; a
    cross-field check names the field it blames (`FieldError`)."""
    typ, ctx = err["type"], err.get("ctx") or {}
    disc = str(ctx.get("discriminator", "")).strip("'")
    known = {"kind": STAGE_KINDS, "name": available_methods(), "process": tuple(PROCESSES)}.get(disc)
    what = {"kind": "stage kind", "name": "method", "process": "noise process"}.get(disc, disc)
    if typ == "union_tag_invalid" and known:
        return f".{disc}", f"unknown {what} {ctx.get('tag')!r} (known: {', '.join(known)})"
    if typ == "union_tag_not_found" and known:
        return f".{disc}", f"missing: give the {what} (one of: {', '.join(known)})"
    error = ctx.get("error")
    if isinstance(error, FieldError):
        return f".{error.field}", str(error)
    return "", str(error) if typ == "value_error" and error is not None else err["msg"]


def _structure_problems(e: ValidationError, raw: Any) -> list[Problem]:
    """One (field path, message) per field pydantic rejected; a plain union's several member
    errors at one path become one line."""
    by_path: dict[str, list[str]] = {}
    for err in e.errors():
        extra, msg = _message(err)
        loc = err["loc"]
        if loc and loc[-1] == "[key]":  # a mapping key that is not text, e.g. YAML's on/yes read as true
            loc = loc[:-2]
            msg = f"the key {err['input']!r} is not text (YAML reads yes/no/on/off as booleans: quote it)"
        msgs = by_path.setdefault(_loc(loc, raw) + extra, [])
        if msg not in msgs:
            msgs.append(msg)
    return [(path, "; or: ".join(msgs)) for path, msgs in by_path.items()]


def _input_problems(r: Recipe) -> list[Problem]:
    """Stage names, and inputs naming existing stages (a list: some, none twice)."""
    probs: list[Problem] = []
    for name, st in r.stages.items():
        if not NAME.fullmatch(name):
            shown = name.encode("unicode_escape").decode()  # one line even for a name with a newline
            probs.append((f"stages.{shown}", "a stage name is letters, digits and _ only (it names the "
                          "stage's output folder and its DVC stage)"))
        for role, v in st.inputs.items():
            at = f"stages.{name}.inputs.{role}"
            if isinstance(v, list) and not v:
                probs.append((at, "an empty list: name at least one stage, or remove the input"))
            elif isinstance(v, list) and len(set(v)) < len(v):
                probs.append((at, f"names a stage more than once: {v}"))
            for up in stage_names(v):
                if up not in r.stages:
                    probs.append((at, f"no stage named {up!r} in this recipe"))
    return probs


def _cycle_problems(r: Recipe) -> list[Problem]:
    """A cycle in the stage graph, at the inputs of the stage that closes it."""
    probs: list[Problem] = []
    color: dict[str, int] = {}

    def dfs(s: str, path: list[str]):
        color[s] = 1
        for u in r.upstream(s):
            if u not in r.stages:
                continue
            if color.get(u) == 1:
                cyc = path[path.index(u):] + [u] if u in path else [s, u]
                probs.append((f"stages.{s}.inputs", "cycle in the stage graph: " + " -> ".join(cyc)))
            elif color.get(u) is None:
                dfs(u, path + [u])
        color[s] = 2

    for s in r.stages:
        if s not in color:
            dfs(s, [s])
    return probs


def local_folder(uri: str) -> Path | None:
    """The local path of a plain path or file:// URI (None for a remote one)."""
    scheme = scheme_of(uri)
    return Path(uri) if scheme is None else Path(urlsplit(uri).path) if scheme == "file" else None


def _data_problems(d: DataConfig) -> list[Problem]:
    """Data settings that could not load: an unknown toy or image dataset, an images root that is
    missing, of an unsupported kind, or without the files its dataset needs."""
    if d.kind == "toy" and d.name not in TOY_DENSITIES:
        return [("data.name", f"unknown toy distribution {d.name!r} (known: {', '.join(TOY_DENSITIES)})")]
    if d.kind != "images":
        return []
    known = ("folder", *IMAGE_SOURCES)
    if d.name not in known:
        return [("data.name", f"unknown image dataset {d.name!r} (known: {', '.join(known)})")]
    if not d.root:
        return [("data.root", "images data needs a root (local path or s3:// URI)")]
    scheme, folder = scheme_of(d.root), local_folder(d.root)
    if folder is None:
        return [] if scheme in STORAGE_SCHEMES else [
            ("data.root", f"unsupported data URI scheme {scheme!r}: a local folder, or s3://bucket/prefix")]
    if not folder.is_dir():
        hint = (f" (an image folder root/<class>/*.png; `fastgen shapes {d.root}` writes the synthetic shapes "
                "folder of params/shapes_cd.yaml there)") if d.name == "folder" else ""
        return [("data.root", f"data path does not exist: {d.root}{hint}" if not folder.exists()
                 else f"not a folder: {d.root}")]
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        return [("data.root", f"cannot read {d.root}: {e.strerror}")]
    if d.name == "folder" and not any(e.is_dir() for e in entries):
        return [("data.root", f"no class subfolders in {d.root} (an image folder is root/<class>/*.png)")]
    if d.name in IMAGE_SOURCES and not (folder / IMAGE_SOURCES[d.name][1]).exists():
        return [("data.root", f"{d.name} files not found: expected {IMAGE_SOURCES[d.name][1]} under {d.root}")]
    return []


def _place_problems(r: Recipe) -> list[Problem]:
    """Where outputs and runs go: a local storage root that is a file, an MLflow store (the
    recipe's, else $MLFLOW_TRACKING_URI's) that is unsupported or a SQLite file in a missing folder."""
    probs: list[Problem] = []
    root = local_folder(r.storage.root)
    if root is not None and root.exists() and not root.is_dir():
        probs.append(("storage.root", f"{r.storage.root} is a file, not a folder"))
    if r.tracking.enabled:
        uri = tracking_uri(r)
        whence = "" if r.tracking.uri else f"$MLFLOW_TRACKING_URI {scrub(uri)!r}: "
        why = tracking_uri_problem(uri)
        if why:
            probs.append(("tracking.uri", whence + why))
        elif uri.startswith("sqlite:///") and not (folder := Path(uri[len("sqlite:///"):]).parent).is_dir():
            probs.append(("tracking.uri", f"{whence}the folder of the SQLite store does not exist: {folder}"))
    return probs


def _graph_problems(r: Recipe) -> list[Problem]:
    """(field path, message) for names and inputs, cycles, each kind's own checks, data and places."""
    probs = _input_problems(r)
    probs += [] if probs else _cycle_problems(r)
    if not probs:  # the kinds' own checks assume an acyclic graph of existing stages
        for name, st in r.stages.items():
            probs += st.problems(r, name)
    return probs + _data_problems(r.data) + _place_problems(r)


def expand_groups(r: Recipe) -> list[Problem]:
    """Replace every group declaration by the stages it stands for (`StageSpec.expand`), in place
    and in declaration order; record them in `r.groups`. Problems: a member name that the recipe
    already uses, a member that is itself a group."""
    stages: dict[str, Any] = {}
    probs: list[Problem] = []
    for name, st in r.stages.items():
        members = st.expand(name, r)
        if not members:
            stages[name] = st
            continue
        if list(members)[-1] != name:
            raise ValueError(f"{type(st).__module__}: a group's last stage must carry its name {name!r}")
        for member, spec in members.items():
            if member != name and (member in r.stages or member in stages):
                probs.append((f"stages.{name}", f"expands into a stage named {member!r}, which this recipe "
                              "already has: rename one of them"))
            elif spec.expand(member, r):
                probs.append((f"stages.{name}", "a group cannot expand into another group"))
            stages[member] = spec
        r._groups[name], r._declarations[name] = list(members), st
    if not probs:
        r.stages = stages
    return probs


def _in_group(r: Recipe, loc: str) -> str:
    """A field path of an expanded member, told where the YAML declares it."""
    m = re.match(r"stages\.([A-Za-z0-9_]+)", loc)
    group = r.declared_as(m.group(1)) if m else None
    return loc if not m or group == m.group(1) else f"{loc} (a stage of group stages.{group})"


def parse_recipe(raw: Any, path: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict. Raises RecipeError listing every problem."""
    if raw is None:
        raise RecipeError([f"{path}: <root>: the recipe is empty: a recipe is a YAML mapping with name and stages"])
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: <root>: a recipe must be a YAML mapping (name, stages, …), "
                           f"not a {type(raw).__name__}"])
    try:
        r = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError([f"{path}: {loc}: {msg}" for loc, msg in _structure_problems(e, raw)]) from None
    r.at(path)
    probs = expand_groups(r) or _graph_problems(r)
    if probs:
        raise RecipeError([f"{path}: {_in_group(r, loc)}: {msg}" for loc, msg in dict.fromkeys(probs)])
    return r


def _mapping_problems(root: yaml.Node) -> list[Problem]:
    """Duplicate keys (PyYAML would keep the last silently), and recursive or exploding aliases,
    found on the composed YAML graph before anything is built from it."""
    probs: list[Problem] = []
    size: dict[int, int] = {}  # node id -> its size with aliases expanded
    busy: set[int] = set()

    def walk(node: yaml.Node, where: str) -> int:
        if id(node) in size:
            return size[id(node)]
        if id(node) in busy:
            probs.append((where or "<root>", f"line {node.start_mark.line + 1}: a recursive YAML alias"))
            return MAX_NODES
        busy.add(id(node))
        n = 1
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple, int] = {}
            for k, v in node.value:
                key = (k.tag, k.value) if isinstance(k, yaml.ScalarNode) else None
                at = f"{where}.{k.value}" if where and key else str(k.value) if key else where
                if key and k.value != "<<" and key in first:
                    probs.append((at, f"duplicate key (line {k.start_mark.line + 1}; first at line {first[key]}): "
                                  "YAML would silently keep the last"))
                elif key:
                    first[key] = k.start_mark.line + 1
                n += walk(k, at) + walk(v, at)
        elif isinstance(node, yaml.SequenceNode):
            n += sum(walk(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(node.value))
        busy.discard(id(node))
        size[id(node)] = n = min(n, MAX_NODES)
        return n

    if walk(root, "") >= MAX_NODES and not probs:
        probs.append(("<root>", f"more than {MAX_NODES} values once YAML aliases are expanded (an alias bomb?)"))
    return probs


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error: where (line) and what."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):
        return (f"line {text[:e.position].count(chr(10)) + 1}: invalid YAML: character #x{e.character:04x} is not "
                "allowed in YAML (a control character)")
    where = f"line {mark.line + 1}" if mark else "<file>"
    what = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return f"{where}: invalid YAML: {what}" + (f" ({context})" if context else "")


def read_yaml(path: str) -> Any:
    """The YAML document of the file at `path`: UTF-8 text, one document, no duplicate keys, safe
    tags only. Raises RecipeError with one line per problem."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RecipeError([f"{path}: <file>: no such recipe file"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: <file>: a folder, not a recipe file"]) from None
    except OSError as e:
        raise RecipeError([f"{path}: <file>: cannot read: {e.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RecipeError([f"{path}: <file>: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): "
                           "save the recipe as UTF-8"]) from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        probs = _mapping_problems(node)
        if probs:
            raise RecipeError([f"{path}: {loc}: {msg}" for loc, msg in probs])
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RecipeError([f"{path}: {_yaml_problem(e, text)}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = str(path)
    return parse_recipe(read_yaml(path), path)
