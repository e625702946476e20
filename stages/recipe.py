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
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, PrivateAttr, ValidationError

from fastgen_core.config import DataConfig, Strict
from fastgen_core.methods import available_methods
from fastgen_core.noise import PROCESSES, NoiseProcess

from . import edit, evaluate, ode_pairs, train, weak_snapshot
from .spec import Problem

# the stage modules and the kinds each runs (a kind's settings are its module's `Spec`)
MODULES = (train, weak_snapshot, ode_pairs, evaluate, edit)
MODULE_OF_KIND = {k: m.__name__.rsplit(".", 1)[1] for m in MODULES
                  for k in m.Spec.model_fields["kind"].annotation.__args__}
STAGE_KINDS = tuple(MODULE_OF_KIND)
StageSpec = Annotated[Union[tuple(m.Spec for m in MODULES)], Field(discriminator="kind")]  # noqa: UP007


class RecipeError(Exception):
    """A recipe that cannot run. `.problems` holds one 'file: field.path: message' line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class ComputeConfig(Strict):
    backend: Literal["local", "ray"] = Field("local", description="local: in-process; ray: Ray Train TorchTrainer")
    num_workers: int = Field(1, gt=0, description="ray: number of training workers")
    use_gpu: bool = Field(False, description="ray: one GPU per worker; local: use CUDA if available")
    cpus_per_worker: int = Field(1, gt=0, description="ray: CPUs reserved per worker")
    threads: int | None = Field(
        None, gt=0, description="CPU threads per process/worker for torch (None: torch's default). Small "
        "models on a shared CPU run fastest with 1: two threads contending with other jobs can be 10-100x slower")


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project")
    experiment: str | None = Field(None, description="MLflow experiment name; default: the recipe name")
    enabled: bool = Field(True, description="log runs to MLflow")


class StorageConfig(Strict):
    root: str = Field("outputs", description="where stage outputs go: a local folder (relative to the project) or s3://bucket/prefix")


class Recipe(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_]+$", description="recipe name: output folder and DVC stage prefix")
    description: str = Field("", description="free text")
    seed: int = Field(0, description="global seed")
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset")
    noise: NoiseProcess = Field(default_factory=lambda: PROCESSES["edm"](), description=(
        "the noise process of every stage (a training stage may set its own `noise`); `process` picks it: "
        f"{' | '.join(PROCESSES)} (default edm)"))
    stages: dict[str, StageSpec] = Field(..., description="named stages; inputs refer to these names")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="where training runs")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="artifact storage")

    _path: str = PrivateAttr("<recipe>")  # set by load_recipe, not part of the YAML

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
            for name in [v] if isinstance(v, str) else v:
                if name not in out:
                    out.append(name)
        return out

    def order(self) -> list[str]:
        """Stages in a topological order (the recipe is validated acyclic)."""
        done: list[str] = []

        def visit(s: str):
            if s not in done:
                for u in self.upstream(s):
                    visit(u)
                done.append(s)

        for s in self.stages:
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


def _loc(loc: tuple, raw: Any) -> str:
    """A pydantic error location as a field path of the YAML. Entering a union member, pydantic
    inserts its tag (a stage's kind, a method's name, a noise process) into the location; those
    are dropped, as they are not keys of the file."""
    out, node, entered = [], raw, False
    for p in loc:
        if entered and isinstance(node, dict) and p in _tags_of(node):
            entered = False
            continue
        out.append(str(p))
        node = node.get(p) if isinstance(node, dict) else (
            node[p] if isinstance(node, list) and isinstance(p, int) and p < len(node) else None)
        entered = True
    return ".".join(out) or "<root>"


def _tags_of(node: dict) -> set:
    """The union tags pydantic may insert on entering this mapping."""
    tags = {node.get(k) for k in ("kind", "name", "process")} - {None}
    return tags if tags else {"edm"}  # an untagged noise mapping is the EDM process


def _message(err: dict) -> tuple[str, str]:
    """(extra path, message) for a pydantic error; union-tag errors name what is known."""
    typ, ctx = err["type"], err.get("ctx") or {}
    disc = str(ctx.get("discriminator", "")).strip("'")
    known = {"kind": STAGE_KINDS, "name": available_methods(), "process": tuple(PROCESSES)}.get(disc)
    what = {"kind": "stage kind", "name": "method", "process": "noise process"}.get(disc, disc)
    if typ == "union_tag_invalid" and known:
        return f".{disc}", f"unknown {what} {ctx.get('tag')!r} (known: {', '.join(known)})"
    if typ == "union_tag_not_found" and known:
        return f".{disc}", f"missing: give the {what} (one of: {', '.join(known)})"
    return "", err["msg"]


def _graph_problems(r: Recipe) -> list[Problem]:
    """(field path, message) for missing inputs, cycles, each kind's own checks, data paths."""
    probs: list[Problem] = []
    for name, st in r.stages.items():
        for role, v in st.inputs.items():
            for up in [v] if isinstance(v, str) else v:
                if up not in r.stages:
                    probs.append((f"stages.{name}.inputs.{role}", f"no stage named {up!r} in this recipe"))
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
    if probs:  # the kinds' own checks assume an acyclic graph of existing stages
        return probs
    for name, st in r.stages.items():
        probs += st.problems(r, name)
    root = r.data.root
    if r.data.kind == "images":
        if not root:
            probs.append(("data.root", "images data needs a root (local path or s3:// URI)"))
        elif "://" not in root and not Path(root).exists():
            probs.append(("data.root", f"data path does not exist: {root}"))
    return probs


def parse_recipe(raw: Any, path: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict. Raises RecipeError listing every problem."""
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: <root>: a recipe must be a YAML mapping"])
    try:
        r = Recipe.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            extra, msg = _message(err)
            lines.append(f"{path}: {_loc(err['loc'], raw)}{extra}: {msg}")
        raise RecipeError(list(dict.fromkeys(lines))) from None
    r.at(path)
    probs = _graph_problems(r)
    if probs:
        raise RecipeError([f"{path}: {loc}: {msg}" for loc, msg in probs])
    return r


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError([f"{path}: <file>: no such recipe file"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise RecipeError([f"{path}: {where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    return parse_recipe(raw, path)
