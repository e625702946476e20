"""The recipe schema: one YAML file in `params/` declares a whole pipeline.

A recipe names its data, its noise process, its stages (each with a kind, its inputs by the name of
the stage that produced them, and its method settings), its compute and its tracking/storage. Every
field is typed, described and defaulted. `load_recipe(path)` validates everything up front — the
structure, each stage's method settings (checked by the method's own `Config`), the stage graph
(missing inputs, cycles) and data paths — and raises `RecipeError` with one line per problem, each
naming the file and the field path.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .config import DataConfig, NetworkConfig, Strict

STAGE_KINDS = ("teacher", "weak_snapshot", "ode_pairs", "distill", "feature_net", "evaluate", "edit")


class RecipeError(Exception):
    """A recipe that cannot run. `.problems` holds one 'file: field.path: message' line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class NoiseConfig(Strict):
    """The EDM process shared by every stage of a recipe (METHODS.md §0)."""

    sigma_min: float = Field(0.002, gt=0, description="smallest noise level")
    sigma_max: float = Field(80.0, gt=0, description="largest noise level (generator input is σ_max·z)")
    rho: float = Field(7.0, gt=0, description="Karras grid curvature")
    sigma_data: float = Field(0.5, gt=0, description="data standard deviation assumed by preconditioning")
    P_mean: float = Field(-1.2, description="teacher training: mean of ln σ")
    P_std: float = Field(1.2, gt=0, description="teacher training: std of ln σ")


class TrainConfig(Strict):
    steps: int = Field(2000, ge=0, description="optimisation steps (iterations of the loop)")
    batch_size: int = Field(256, gt=0, description="global batch size, split across workers")
    lr: float = Field(1e-3, gt=0, description="learning rate (methods may scale it per optimiser)")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="optimiser family")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    grad_clip: float | None = Field(None, gt=0, description="clip gradient norm per optimiser (None: no clipping)")
    lr_warmup: int = Field(0, ge=0, description="linear learning-rate warmup steps")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="evaluation EMA decay per step")
    ckpt_every: int = Field(500, gt=0, description="write a resumable checkpoint every this many steps")
    log_every: int = Field(50, gt=0, description="log metrics every this many steps")
    snapshots: list[int] = Field(
        [], description="steps at which the loop keeps a copy of the EMA weights; training stages save them as "
        "model folders snapshots/step_NNNNNN/ (e.g. an early snapshot as an autoguidance guide)")
    snapshot_ema_decay: float | None = Field(
        None, ge=0, lt=1, description="EMA decay of the snapshots (the guide's EMA is tuned separately); "
        "None: snapshot the evaluation EMA")

    @model_validator(mode="after")
    def _snapshots_within_run(self):
        bad = [k for k in self.snapshots if not 1 <= k <= self.steps]
        if bad:
            raise ValueError(f"snapshots {bad} outside 1..steps = {self.steps}")
        return self


class PairsConfig(Strict):
    n_pairs: int = Field(20000, gt=0, description="number of (noise, sample, label) teacher couplings")
    steps: int = Field(18, gt=0, description="Heun steps of the teacher ODE solve (NFE = 2·steps − 1)")
    batch_size: int = Field(4096, gt=0, description="samples per solver batch")


class GuidanceSpec(Strict):
    """One guided sampler of an EDM teacher, evaluated as an extra row at the teacher NFEs
    (METHODS.md §12). NFE counts guided-denoiser calls; each costs two network evaluations."""

    kind: Literal["auto", "cfg"] = Field(
        ..., description="auto: D_weak + w·(D_main − D_weak); cfg: D(∅) + w·(D(c) − D(∅))")
    main: str = Field(..., description="stage name of the main (EDM) model; an input of this evaluate stage")
    guide: str | None = Field(None, description="auto: stage name of the weak guide (an input of this evaluate stage)")
    w: float = Field(..., gt=0, description="guidance weight (1: the main model unguided)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_+.-]+$",
                             description="row name; default <main>+auto_<guide>_w<w> or <main>+cfg_w<w>")

    @property
    def row(self) -> str:
        if self.name:
            return self.name
        return f"{self.main}+auto_{self.guide}_w{self.w:g}" if self.kind == "auto" else f"{self.main}+cfg_w{self.w:g}"


class GuideConfig(Strict):
    mode: Literal["snapshot", "smaller"] = Field(
        "smaller", description="snapshot: an early EMA snapshot of the `teacher` input (its train.snapshots); "
        "smaller: train this stage's own (smaller) network with its method for its (fewer) steps")
    step: int | None = Field(None, gt=0, description="snapshot: which of the teacher's train.snapshots to take")


class EvalConfig(Strict):
    n_samples: int = Field(5000, gt=0, description="samples per model, NFE and seed")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="seeds: metrics are reported as mean ± std over them")
    nfe: list[int] = Field([1, 2, 4, 8], description="NFEs at which students are evaluated")
    teacher_nfe: list[int] = Field([1, 3, 35], description="NFEs at which teachers are evaluated (Heun: 2·steps − 1)")
    plots: bool = Field(True, description="write sample plots and quality-vs-NFE plot")
    guidance: list[GuidanceSpec] = Field([], description="guided samplers of EDM models, evaluated at teacher_nfe")
    pass_factor: float = Field(2.0, ge=0, description=(
        "a student passes (and is registered in the MLflow model registry) when its primary metric's "
        "distance above the real-data floor at 1 NFE is at most this times the teacher's at its largest NFE"))


class EditConfig(Strict):
    """Zero-shot editing of held-out test images with a consistency-type model (CM Alg. 4)."""

    task: Literal["inpaint", "superres", "colorize"] = Field(
        "inpaint", description="inpaint: fill masked pixels; superres: restore detail keeping k×k patch means; "
        "colorize: restore colour keeping the luminance (RGB data)")
    mask: Literal["left_half", "right_half", "top_half", "bottom_half", "center", "random"] = Field(
        "left_half", description="inpaint: the region to fill (center: the middle square of half the side; "
        "random: each pixel with probability `fraction`, per image)")
    fraction: float = Field(0.5, gt=0, lt=1, description="inpaint with mask random: fraction of pixels to fill")
    k: int = Field(2, ge=2, description="superres: patch size (the image side must be a multiple)")
    n_images: int = Field(100, gt=0, description="number of test-split images edited (the first ones)")
    steps: int = Field(4, gt=0, description="model evaluations: τ = Karras grid of steps + 1 levels without its last")
    samples: int = Field(1, gt=0, description="edits per image (different noise); with more than one, their mean "
                         "(a posterior-mean estimate: what MSE rewards) is scored too")
    seed: int = Field(0, description="seed of the noise (and of a random mask)")
    plots: bool = Field(True, description="write a truth | observed | edited | [mean] | baseline image grid")


class StageSpec(Strict):
    kind: str = Field(..., description=f"stage kind: one of {', '.join(STAGE_KINDS)}")
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="role -> name(s) of the stage(s) whose outputs this stage consumes")
    method: dict[str, Any] | None = Field(
        None, description="method settings; `name` picks the module in fastgen_core/methods, the rest is its Config")
    network: NetworkConfig | None = Field(None, description="network of the model this stage trains")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training-loop settings")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="ode_pairs: settings")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="evaluate: settings")
    guide: GuideConfig = Field(default_factory=GuideConfig, description="weak_snapshot: how the weak guide is made")
    edit: EditConfig = Field(default_factory=EditConfig, description="edit: settings")


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
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="noise process shared by all stages")
    stages: dict[str, StageSpec] = Field(..., description="named stages; inputs refer to these names")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="where training runs")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="artifact storage")

    # set by load_recipe, not part of the YAML
    _path: str = "<recipe>"

    @property
    def path(self) -> str:
        return self._path

    def method_config(self, stage: str) -> BaseModel | None:
        """The stage's method settings, validated by the method module's own Config."""
        from .methods import get_method

        m = self.stages[stage].method
        return None if m is None else get_method(m["name"]).Config.model_validate(m)

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
        """Everything that determines a stage's outputs besides its inputs: hashed into its manifest."""
        d = self.model_dump(mode="json")
        return {"seed": d["seed"], "data": d["data"], "noise": d["noise"], "stage": d["stages"][stage]}

    def digest(self, stage: str | None = None) -> str:
        payload = self.stage_params(stage) if stage else self.model_dump(mode="json")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _model_method(r: Recipe, stage: str, seen: tuple = ()) -> str | None:
    """The method a stage's saved model samples with (a snapshot guide: its teacher's)."""
    st = r.stages.get(stage)
    if st is None or stage in seen:
        return None
    if st.kind == "weak_snapshot" and st.guide.mode == "snapshot":
        t = st.inputs.get("teacher")
        return _model_method(r, t, seen + (stage,)) if isinstance(t, str) else None
    return (st.method or {}).get("name")


def _weak_snapshot_problems(r: Recipe, name: str, st: StageSpec) -> list[tuple[str, str]]:
    """A snapshot guide names a teacher stage that keeps that snapshot; a smaller guide trains
    with its teacher's method (the same task and conditioning)."""
    at, probs = f"stages.{name}", []
    teacher = st.inputs.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        return [(f"{at}.inputs.teacher", "a weak_snapshot stage takes one teacher")]
    t = r.stages.get(teacher) if teacher else None
    if st.guide.mode == "snapshot":
        if teacher is None:
            probs.append((f"{at}.inputs.teacher", "guide.mode snapshot needs the teacher stage it snapshots"))
        if st.guide.step is None:
            probs.append((f"{at}.guide.step", "guide.mode snapshot needs the snapshot step"))
        elif t is not None and st.guide.step not in t.train.snapshots:
            probs.append((f"{at}.guide.step", f"stage {teacher!r} keeps no snapshot at step {st.guide.step} "
                          f"(its train.snapshots: {t.train.snapshots})"))
        for field in ("method", "network"):
            if getattr(st, field) is not None:
                probs.append((f"{at}.{field}", "guide.mode snapshot copies the teacher's model: remove it"))
    else:
        if st.guide.step is not None:
            probs.append((f"{at}.guide.step", "only guide.mode snapshot takes a step"))
        if st.network is None:
            probs.append((f"{at}.network", "guide.mode smaller needs the guide's (smaller) network"))
        if t is not None and st.method and _model_method(r, teacher) != st.method.get("name"):
            probs.append((f"{at}.method.name", f"the guide must be trained like its teacher {teacher!r} "
                          f"(method {_model_method(r, teacher)!r})"))
    return probs


def _guidance_problems(r: Recipe, name: str, i: int, g: GuidanceSpec) -> list[tuple[str, str]]:
    at, probs, ups = f"stages.{name}.evaluate.guidance.{i}", [], r.upstream(name)
    for field in ("main", "guide"):
        s = getattr(g, field)
        if s is None:
            continue
        if s not in ups:
            probs.append((f"{at}.{field}", f"{s!r} is not an input of this evaluate stage"))
        elif _model_method(r, s) != "edm":
            probs.append((f"{at}.{field}", f"guidance needs an EDM denoiser; stage {s!r} is not an edm model"))
    if g.kind == "auto" and g.guide is None:
        probs.append((f"{at}.guide", "kind auto needs a guide"))
    if g.kind == "cfg":
        if g.guide is not None:
            probs.append((f"{at}.guide", "kind cfg guides the main model with itself: remove guide"))
        main = r.stages.get(g.main)
        if not r.data.conditional:
            probs.append((f"{at}.kind", "cfg needs class-conditional data (data.conditional: true)"))
        elif main is not None and main.method and not main.method.get("label_dropout"):
            probs.append((f"{at}.main", f"cfg needs a main model trained with label_dropout > 0 (stage {g.main!r})"))
    rows = [x.row for x in r.stages[name].evaluate.guidance]
    if rows.count(g.row) > 1 or g.row in ups:
        probs.append((f"{at}.name", f"row name {g.row!r} is not unique"))
    return probs


def _graph_problems(r: Recipe) -> list[tuple[str, str]]:
    """(field path, message) for unknown kinds/methods, bad method settings, missing inputs, cycles."""
    from .methods import available_methods, get_method

    probs: list[tuple[str, str]] = []
    for name, st in r.stages.items():
        if st.kind not in STAGE_KINDS:
            probs.append((f"stages.{name}.kind", f"unknown stage kind {st.kind!r} (known: {', '.join(STAGE_KINDS)})"))
        for role, v in st.inputs.items():
            for up in [v] if isinstance(v, str) else v:
                if up not in r.stages:
                    probs.append((f"stages.{name}.inputs.{role}", f"no stage named {up!r} in this recipe"))
        if st.method is not None:
            mname = st.method.get("name")
            if mname not in available_methods():
                probs.append((f"stages.{name}.method.name",
                              f"unknown method {mname!r} (known: {', '.join(available_methods())})"))
            else:
                try:
                    get_method(mname).Config.model_validate(st.method)
                except ValidationError as e:
                    for err in e.errors():
                        probs.append((f"stages.{name}.method.{_loc(err['loc'])}", err["msg"]))
        elif st.kind in ("teacher", "distill", "feature_net") or (
                st.kind == "weak_snapshot" and st.guide.mode == "smaller"):
            probs.append((f"stages.{name}.method", f"a {st.kind} stage needs a method"))
        if st.kind == "weak_snapshot":
            probs += _weak_snapshot_problems(r, name, st)
        for i, g in enumerate(st.evaluate.guidance if st.kind == "evaluate" else []):
            probs += _guidance_problems(r, name, i, g)
        if st.kind == "edit":
            probs += _edit_problems(r, name, st)
    # cycles (only among existing names)
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
    # data paths
    root = r.data.root
    if r.data.kind == "images":
        if not root:
            probs.append(("data.root", "images data needs a root (local path or s3:// URI)"))
        elif "://" not in root and not Path(root).exists():
            probs.append(("data.root", f"data path does not exist: {root}"))
    return probs


def _edit_problems(r: Recipe, name: str, st: StageSpec) -> list[tuple[str, str]]:
    """An edit stage needs one `model` input trained by a consistency-type method (one whose module
    has `consistency_fn`), and colorization needs RGB data."""
    from .methods import available_methods, get_method

    model = st.inputs.get("model")
    if not isinstance(model, str):
        return [(f"stages.{name}.inputs.model", "an edit stage needs one model stage as input `model`")]
    probs = []
    up = r.stages.get(model)
    mname = (up.method or {}).get("name") if up else None
    if up is not None and (mname not in available_methods() or not hasattr(get_method(mname), "consistency_fn")):
        probs.append((f"stages.{name}.inputs.model", f"stage {model!r} ({up.kind}, method {mname!r}) is not a "
                      "consistency-type model: editing needs one with consistency_fn (cd, ct, scm, ctm, ayf)"))
    if r.data.kind == "toy":
        probs.append((f"stages.{name}.kind", "editing needs image data (data.kind digits or images), not toy"))
    elif st.edit.task == "colorize" and not r.data.color and r.data.kind != "images":
        probs.append((f"stages.{name}.edit.task", "colorize needs RGB data (e.g. data.color: true for digits)"))
    return probs


def parse_recipe(raw: Any, path: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict. Raises RecipeError listing every problem."""
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: <root>: a recipe must be a YAML mapping"])
    try:
        r = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError([f"{path}: {_loc(err['loc'])}: {err['msg']}" for err in e.errors()]) from None
    r._path = path
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
