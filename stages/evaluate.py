"""Stage `evaluate`: every input model at every NFE, each metric with its floor (held-out real
vs real, same sample count) and its spread over seeds.

Inputs: `models` (list of model stages), and for images `features` (a feature_net stage).
`evaluate.guidance` adds rows for guided samplers of EDM models (autoguidance with a weak guide
input, or classifier-free guidance), named `<main>+auto_<guide>_w<w>` / `<main>+cfg_w<w>`, at the
teacher NFEs (an NFE is one guided-denoiser call, i.e. two network evaluations).
Outputs: `metrics.json` (model → nfe_K → metric statistics; `dvc metrics show` reads it),
`samples/<model>_nfe<K>.npz` (the samples of every seed, so anyone can recompute a metric) and
`plots/` (samples over the data or image grids, quality vs NFE, on images precision vs recall, and
on 2D the sampled paths).

Image metrics (docs/design.md "Image metrics"), each per model × NFE with its floor (n train images
against the test split): `fd` (Fréchet distance in the feature net's features), `precision` and
`recall` (k-NN manifolds, Kynkäänniemi et al. 2019, `evaluate.pr_k`, against n test images in the
same features), and `inception_fid` (standard Inception FID through torch-fidelity) when its weights are
on the machine (`evaluate.inception_fid`: auto | true | false; the outcome is the manifest's
`metrics.inception_fid_status`).

Deterministic noise → data maps (docs/methods.md §2, §13), per model, next to the nfe_K entries:
- `coupling` (with input `pairs`, one pair set or a list): E‖G(z) − x‖² over the first 2000 pairs
  (z, x) of the pair set the model was trained on (its model.json `pairs_digest`; else the first):
  `mse` at 1 NFE (a teacher: at its largest NFE), and `nfe_K` at every NFE for methods that define
  `trajectory` (deterministic multistep samplers);
- `inversion` (methods that define `invert(model, x, nfe, class_labels) -> z`): E‖G(G⁻¹(x)) − x‖²
  on the first 2000 held-out data points, `nfe_K` with K steps each way (a method's own
  `reconstruct(model, x, nfe, class_labels)` where it defines one: CAF keeps the inversion's v̂);
- `straightness` (methods that define `trajectory(model, z, nfe, class_labels) -> (nfe + 1, n, ...)`):
  rectified flow's S = ∫ E‖(Z1 − Z0) − Ż_t‖² dt along the K-step sampled paths, `nfe_K` for K ≥ 2
  (`metrics.straightness`; 0 for straight paths).
CLI: python -m stages.run RECIPE.yaml STAGE
"""
from __future__ import annotations

import json
import sys
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from fastgen_core import metrics as M
from fastgen_core.config import Strict, distinct, seeds_in_range
from fastgen_core.data import cached_data
from fastgen_core.models import load_model
from fastgen_core.methods.guided import W_MODELS
from fastgen_core.samplers import autoguided, cfg_guided, teacher_nfe, teacher_sample

from .spec import Problem, StageError, StageSpec, one_input, stage_names

class GuidanceSpec(Strict):
    """One guided sampler of an EDM teacher, evaluated as an extra row at the teacher NFEs
    (docs/methods.md §12). NFE counts guided-denoiser calls; each costs two network evaluations."""

    kind: Literal["auto", "cfg", "w"] = Field(
        ..., description="auto: D_weak + w·(D_main − D_weak); cfg: D(∅) + w·(D(c) − D(∅)); w: a w-conditioned "
        "model (methods guided, progressive; docs/methods.md §9) sampled at its own w (w = 0 unguided), "
        "row <main>_w<w>, at the student NFEs")
    main: str = Field(..., description="stage name of the main (EDM) model; an input of this evaluate stage")
    guide: str | None = Field(None, description="auto: stage name of the weak guide (an input of this evaluate stage)")
    w: float = Field(..., ge=0, description="guidance weight (auto, cfg: > 0, 1 the main model unguided; w: ≥ 0)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_+.-]+$",
                             description="row name; default <main>+auto_<guide>_w<w> or <main>+cfg_w<w>")

    @property
    def row(self) -> str:
        if self.name:
            return self.name
        if self.kind == "w":
            return f"{self.main}_w{self.w:g}"
        return f"{self.main}+auto_{self.guide}_w{self.w:g}" if self.kind == "auto" else f"{self.main}+cfg_w{self.w:g}"


class EvalConfig(Strict):
    n_samples: int = Field(5000, gt=0, description="samples per model, NFE and seed")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="seeds (distinct, 0..2^32 − 1): metrics are "
                             "reported as mean ± std over them")
    nfe: list[int] = Field([1, 2, 4, 8], min_length=1,
                           description="NFEs at which students are evaluated (distinct, > 0)")
    teacher_nfe: list[int] = Field([1, 3, 35], min_length=1, description="NFEs at which teachers are evaluated "
                                   "(distinct: 1, 2 or odd, as Heun spends 2·steps − 1)")
    plots: bool = Field(True, description="write sample plots and quality-vs-NFE plot")
    guidance: list[GuidanceSpec] = Field([], description="guided samplers of EDM models, evaluated at teacher_nfe")
    sample_batch: int | None = Field(None, gt=0, description=(
        "samples per network call when generating (and in the coupling, inversion and straightness maps); null: "
        "all n_samples of a seed at once. Set it for large networks on a GPU. A deterministic sampler gives the "
        "same samples whatever the batch; a stochastic one draws its noise batch after batch, so the same "
        "distribution but other samples"))
    pass_factor: float = Field(2.0, ge=0, description=(
        "a student passes (and is registered in the MLflow model registry) when its primary metric's "
        "distance above the real-data floor at 1 NFE is at most this times the teacher's at its largest NFE"))

    pr_k: int = Field(3, ge=1, description=(
        "image data: k of the k-NN manifolds of precision and recall (Kynkäänniemi et al. 2019) in the feature "
        "net's features; < n_samples"))
    inception_fid: Literal["auto"] | bool = Field("auto", description=(
        "image data: standard Inception FID (torch-fidelity's Inception-v3, weights never downloaded here). auto: "
        "computed when the weights file is present, else skipped with the reason recorded in the manifest "
        "(metrics.inception_fid_status); true: an error when it is absent; false: off"))
    inception_weights: str | None = Field(None, min_length=1, description=(
        "path of torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth); default "
        "$FASTGEN_INCEPTION_WEIGHTS, else torch-fidelity's download location (<torch hub dir>/checkpoints/)"))

    class_groups: list[list[int]] = Field([], description=(
        "class-conditional image data: also the FD of each group of classes (the samples of those labels against "
        "the test images of those classes, floor: matched train images), per model and NFE as groups_nfe_K.c<a>_<b>… "
        "(e.g. the class groups of Multi-Student Distillation, docs/methods.md §8)"))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]):
        return distinct(seeds_in_range(v), "seeds")

    @field_validator("nfe", "teacher_nfe")
    @classmethod
    def _nfes(cls, v: list[int]):
        if any(n <= 0 for n in v):
            raise ValueError(f"every NFE must be > 0, got {v}")
        return distinct(v, "NFEs")

    @field_validator("teacher_nfe")
    @classmethod
    def _heun(cls, v: list[int]):
        even = [n for n in v if teacher_nfe(n) != n]
        if even:
            raise ValueError(f"Heun spends 2·steps − 1 evaluations: {', '.join(map(str, even))} would run as "
                             f"{', '.join(str(teacher_nfe(n)) for n in even)} (use 1, 2 or an odd number)")
        return v


class Spec(StageSpec):
    """Every model of input `models` (and the guided rows) at every NFE; `features` for images,
    `pairs` for coupling preservation."""

    kind: Literal["evaluate"]
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="samples, seeds, NFEs, guidance, plots")

    def problems(self, recipe, name: str) -> list[Problem]:
        at, probs = f"stages.{name}.inputs", []
        if "models" not in self.inputs:
            probs.append((f"{at}.models", "an evaluate stage needs the list of models it evaluates"))
        for role, v in self.inputs.items():  # models, and any other role naming guidance models
            for up in [] if role in ("features", "pairs") else stage_names(v):
                if up in recipe.stages and recipe.model_method(up) is None:
                    probs.append((f"{at}.{role}", f"stage {up!r} ({recipe.stages[up].kind}) makes no model"))
        feats = one_input(self, "features")
        if recipe.data.kind != "toy" and "features" not in self.inputs:
            probs.append((f"{at}.features", "image data is scored in the features of a feature_net stage: "
                          "give it as input `features`"))
        if feats in recipe.stages and recipe.model_method(feats) != "classifier":
            probs.append((f"{at}.features", f"stage {feats!r} is not a feature network (method classifier)"))
        for pairs in stage_names(self.inputs.get("pairs", [])):
            if pairs in recipe.stages and recipe.stages[pairs].kind != "ode_pairs":
                probs.append((f"{at}.pairs", f"stage {pairs!r} is not an ode_pairs stage"))
        for i, g in enumerate(self.evaluate.guidance):
            probs += _guidance_problems(recipe, name, i, g)
        ev, at_ev = self.evaluate, f"stages.{name}.evaluate"
        if recipe.data.kind != "toy" and ev.pr_k >= ev.n_samples:
            probs.append((f"{at_ev}.pr_k", f"k = {ev.pr_k} nearest neighbours need more than k samples "
                          f"(n_samples = {ev.n_samples})"))
        if recipe.data.kind == "toy" and ev.inception_fid is True:
            probs.append((f"{at_ev}.inception_fid", "Inception FID needs image data"))
        if self.evaluate.class_groups and (recipe.data.kind == "toy" or not recipe.data.conditional):
            probs.append((f"stages.{name}.evaluate.class_groups", "per-group FD needs class-conditional image data"))
        return probs


def _guidance_problems(r, name: str, i: int, g: GuidanceSpec) -> list[Problem]:
    at, probs, ups = f"stages.{name}.evaluate.guidance.{i}", [], r.upstream(name)
    for field in ("main", "guide"):
        s = getattr(g, field)
        if s is None:
            continue
        if s not in ups:
            probs.append((f"{at}.{field}", f"{s!r} is not an input of this evaluate stage"))
        elif g.kind == "w":  # a w-conditioned model sampled at its own w (docs/methods.md §9)
            if field == "guide":
                probs.append((f"{at}.guide", "kind w samples the main model at its own w: remove guide"))
            elif r.model_method(s) not in W_MODELS:
                probs.append((f"{at}.main", f"kind w needs a w-conditioned model (method {' or '.join(W_MODELS)}); "
                              f"stage {s!r} is not one"))
        elif r.model_method(s) != "edm":
            probs.append((f"{at}.{field}", f"guidance needs an EDM denoiser; stage {s!r} is not an edm model"))
    if g.kind != "w" and g.w <= 0:
        probs.append((f"{at}.w", f"kind {g.kind} needs a guidance weight w > 0"))
    if g.kind == "auto" and g.guide is None:
        probs.append((f"{at}.guide", "kind auto needs a guide"))
    if g.kind == "cfg":
        if g.guide is not None:
            probs.append((f"{at}.guide", "kind cfg guides the main model with itself: remove guide"))
        main = r.stages.get(g.main)
        method = getattr(main, "method", None)
        if not r.data.conditional:
            probs.append((f"{at}.kind", "cfg needs class-conditional data (data.conditional: true)"))
        elif method is not None and not getattr(method, "label_dropout", 0):
            probs.append((f"{at}.main", f"cfg needs a main model trained with label_dropout > 0 (stage {g.main!r})"))
    rows = [x.row for x in r.stages[name].evaluate.guidance]
    if rows.count(g.row) > 1 or g.row in ups:
        probs.append((f"{at}.name", f"row name {g.row!r} is not unique"))
    return probs


PRIMARY = {"toy": "swd", "image": "fd"}


def _batched(fn, batch: int | None, x: torch.Tensor, y: torch.Tensor | None, device, dim: int = 0,
             desc: str = "") -> torch.Tensor:
    """fn(x_chunk, y_chunk) on `device` over chunks of `batch` rows of x (and y), all at once when
    `batch` is None; the float32 results on the CPU, joined along `dim` (1 for paths)."""
    step = batch or len(x)
    starts = range(0, len(x), step)
    out = [fn(x[i:i + step].to(device), None if y is None else y[i:i + step].to(device)).float().cpu()
           for i in tqdm(starts, desc=desc, unit="batch", mininterval=2.0, disable=len(starts) < 2)]
    return torch.cat(out, dim=dim)


def _generate(model, n: int, nfe: int, seed: int, labels, device, batch: int | None = None) -> torch.Tensor:
    """n samples for one seed, `batch` at a time (EvalConfig.sample_batch); a conditional model
    gets `labels[seed]` (`metrics.eval_labels`)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    z = model.noise.draw(n, model.shape, g)  # standard normal, or a flow's source mixture
    y = labels[seed] if model.num_classes > 0 else None
    torch.manual_seed(20_000 + seed)  # stochastic multistep samplers
    return _batched(lambda zb, yb: model.sample(zb, nfe, yb), batch, z, y, device, desc=f"sampling {nfe} NFE")


class Guided:
    """A guided sampler of an EDM model with the interface `_generate` uses (docs/methods.md §12):
    D_w = D_weak + w·(D_main − D_weak) (auto) or D(∅) + w·(D(c) − D(∅)) (cfg), Heun on the Karras grid."""

    meta = {"method": "edm"}

    def __init__(self, spec, models: dict):
        main = models[spec.main]
        D = main.denoiser()
        self.D = (autoguided(D, models[spec.guide].denoiser(), spec.w) if spec.kind == "auto"
                  else cfg_guided(D, spec.w, main.num_classes))
        self.shape, self.num_classes, self.noise = main.shape, main.num_classes, main.noise

    @torch.no_grad()
    def sample(self, z, nfe, class_labels=None):
        return teacher_sample(self.D, z, self.noise, nfe, class_labels=class_labels)


class AtW:
    """A w-conditioned model (guided, progressive; docs/methods.md §9) sampled at the row's w."""

    def __init__(self, spec, models: dict):
        self.main, self.w = models[spec.main], spec.w
        self.meta, self.shape, self.num_classes = self.main.meta, self.main.shape, self.main.num_classes
        self.method, self.noise, self.nets = self.main.method, self.main.noise, self.main.nets

    @torch.no_grad()
    def sample(self, z, nfe, class_labels=None):
        return self.main.method.sample(self.main, z, nfe, class_labels, w=self.w)


def _group_fd(groups, samples: dict, labels: dict, feats, data, seeds, floors: dict) -> dict:
    """FD of each class group: per seed, the samples whose label is in the group against the test
    images of the group; floor: as many train images of the same labels (`metrics.matched_rows`).
    `floors` caches each group's test features and floor across models."""
    out = {}
    for g in groups:
        rows = {s: torch.isin(labels[s], torch.as_tensor(g)) for s in seeds}
        key = "c" + "_".join(map(str, g))
        if key not in floors:
            ref = feats(data.x_test[torch.isin(data.y_test, torch.as_tensor(g))])
            floors[key] = ref, np.array([M.frechet_distance(
                feats(data.x[M.matched_rows(data.y, labels[s][rows[s]], s)]), ref) for s in seeds])
        ref, real = floors[key]
        gen = np.array([M.frechet_distance(feats(samples[s][rows[s]]), ref) for s in seeds])
        sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
        out[key] = {"mean": round(float(gen.mean()), 6), "std": round(sd(gen), 6), "floor_mean": round(float(real.mean()), 6),
                    "floor_std": round(sd(real), 6), "above_floor": round(float(gen.mean() - real.mean()), 6)}
    return out


N_MAP = 2000  # pairs, data points and paths of the deterministic-map metrics


def _pair_sets(inputs) -> list[tuple[str | None, dict]]:
    """(pairs_digest recorded by ode_pairs or None, first N_MAP pairs) of each `pairs` input."""
    out = []
    for i in inputs:
        with np.load(i.path / "pairs.npz") as z:
            out.append(((i.manifest.get("metrics") or {}).get("pairs_digest"),
                        {k: torch.from_numpy(z[k][:N_MAP]) for k in ("noise", "sample", "label")}))
    return out


def _own_pairs(model, sets: list[tuple[str | None, dict]]) -> dict:
    """The pair set `model` was trained on (model.json `pairs_digest`), else the first one."""
    digest = model.meta.get("pairs_digest")
    return next((p for d, p in sets if digest is not None and d == digest), sets[0][1])


@torch.no_grad()
def _coupling(model, pairs: dict, nfes: list[int], is_teacher: bool, device, batch: int | None = None) -> dict:
    """How well a model keeps a deterministic coupling: E‖G(z) − x‖² between its sample from a
    pair's noise z and the pair's sample x (students at 1 NFE, the teacher at its largest NFE as
    `mse`; models with a deterministic multistep sampler at every NFE as `nfe_K`)."""
    noise, target = pairs["noise"], pairs["sample"]
    y = pairs["label"] if model.num_classes > 0 else None
    mse: dict[int, float] = {}  # NFE -> E‖G(z) − x‖², each computed once

    def at(k: int) -> float:
        if k not in mse:
            mse[k] = round(M.mean_sq_distance(_batched(lambda zb, yb: model.sample(zb, k, yb), batch, noise, y,
                                                       device), target), 6)
        return mse[k]

    nfe = max(nfes) if is_teacher else 1
    out = {"nfe": teacher_nfe(nfe) if is_teacher else 1, "mse": at(nfe)}
    if not is_teacher and hasattr(model.method, "trajectory"):
        out.update({f"nfe_{k}": at(k) for k in nfes})
    return out


@torch.no_grad()
def _inversion(model, x: torch.Tensor, y, nfes: list[int], device, batch: int | None = None) -> dict:
    """E‖G(G⁻¹(x)) − x‖² on data x with K steps each way (the method's `invert`)."""
    y = None if y is None or model.num_classes == 0 else y
    rec = getattr(model.method, "reconstruct", None)  # a method's own G(G⁻¹(x)) (CAF keeps its v̂)

    def back(k):
        def one(xb, yb):
            return rec(model, xb, k, yb) if rec else model.sample(model.method.invert(model, xb, k, yb), k, yb)
        return _batched(one, batch, x, y, device)
    return {f"nfe_{k}": round(M.mean_sq_distance(back(k), x.cpu()), 6) for k in nfes}


@torch.no_grad()
def _straightness(model, labels, nfes: list[int], device,
                  batch: int | None = None) -> tuple[dict, dict[int, torch.Tensor]]:
    """Straightness of the K-step sampled paths from fixed noise (the method's `trajectory`), and
    the paths themselves."""
    n = N_MAP if labels is None else min(N_MAP, len(labels))
    z = model.noise.draw(n, model.shape, torch.Generator().manual_seed(40_000))
    y = labels[:n] if model.num_classes > 0 else None
    paths = {k: _batched(lambda zb, yb, k=k: model.method.trajectory(model, zb, k, yb), batch, z, y, device, dim=1)
             for k in nfes if k >= 2}
    return {f"nfe_{k}": round(M.straightness(p), 6) for k, p in paths.items()}, paths


def _inception(cfg: EvalConfig, x_test: torch.Tensor, device, at: str):
    """((Inception features, those of the test split) or None, the status line the manifest records).
    Never downloads: the weights file must be on the machine (`metrics.inception_weights_path`)."""
    if cfg.inception_fid is False:
        return None, "off (evaluate.inception_fid: false)"
    path = M.inception_weights_path(cfg.inception_weights)
    if not path.is_file():
        why = (f"no Inception-v3 weights file at {path} (set evaluate.inception_weights or ${M.INCEPTION_ENV}; "
               "they are never downloaded at run time)")
        if cfg.inception_fid is True:
            raise StageError(f"{at}.evaluate.inception_fid: true, but {why}")
        return None, f"skipped: {why}"
    net = M.InceptionFeatures(path, device)
    return (net, net(x_test)), f"computed with the weights at {path}"


def run(ctx) -> None:
    cfg, recipe = ctx.spec.evaluate, ctx.recipe
    data = cached_data(recipe.data)
    device = ctx.device
    if data.is_image:
        if "features" not in ctx.inputs:
            raise StageError(f"{recipe.path}: stages.{ctx.name}.inputs.features: image data needs a feature_net stage")
        fnet = load_model(ctx.input("features").path, device).nets["net"]

        @torch.no_grad()
        def feats(x):
            return torch.cat([fnet.features(b.to(device)).cpu() for b in x.split(1024)])

        ref = feats(data.x_test)
        n = min(cfg.n_samples, len(data.x_test))
        if n <= cfg.pr_k:
            raise StageError(f"{recipe.path}: stages.{ctx.name}.evaluate.pr_k: k = {cfg.pr_k} nearest neighbours "
                             f"need more than k samples (n = {n})")
        # precision/recall: the real manifold of n test images (a fixed subset of a larger split), radii once
        pr_ref = ref[torch.randperm(len(ref), generator=torch.Generator().manual_seed(50_000))[:n]]
        pr_radii = M.knn_radii(pr_ref, cfg.pr_k, device=device)
        incept, inception_status = _inception(cfg, data.x_test, device, f"{recipe.path}: stages.{ctx.name}")
        print(f"[evaluate] Inception FID: {inception_status}", file=sys.stderr)

        def metric_fn(s):
            f = feats(s)
            out = {"fd": M.frechet_distance(f, ref)}
            out.update(M.precision_recall(pr_ref, f, cfg.pr_k, real_radii=pr_radii, device=device))
            if incept is not None:
                out["inception_fid"] = M.inception_fid(incept[0](s), incept[1])
            return out

        # bits models (discrete data, docs/methods.md §7): also the value-histogram distance at their levels L
        levels = sorted({recipe.stages[i.stage].method.levels for i in ctx.inputs["models"]
                         if recipe.model_method(i.stage) == "bits"})
        if levels:
            fd_fn = metric_fn
            metric_fn = lambda s: {**fd_fn(s), **{f"value_hist_{L}": M.value_histogram_distance(s, data.x_test, L)  # noqa: E731
                                                  for L in levels}}
        real_pool, pool_labels = data.x, data.y  # floor: n real train images against the test split
    else:
        n, inception_status = cfg.n_samples, None
        metric_fn = lambda s: M.toy_metrics(s, data.density, data.x_test)  # noqa: E731
        # fresh draws for the floor (twice n when conditional, so that a class-matched floor finds its rows)
        real_pool, pool_labels = data.density.sample(n * (2 if data.num_classes else 1), torch.Generator().manual_seed(777))
    # class-conditional data: every seed's generated set and floor share the test split's class histogram
    labels = {s: M.eval_labels(data.y_test, n, s) for s in cfg.seeds} if data.num_classes else None
    prim = PRIMARY["image" if data.is_image else "toy"]
    floor_per_seed = M.floor_metrics(metric_fn, real_pool, n, cfg.seeds, pool_labels, labels)  # same for all rows

    results, curves, group_floors, pr_points = {}, {}, {}, {}
    (ctx.out / "samples").mkdir()
    (ctx.out / "plots").mkdir()
    panels, paths_2d = {}, {}
    pair_sets = _pair_sets(ctx.inputs["pairs"]) if "pairs" in ctx.inputs else []
    x_map = data.x_test[:N_MAP]
    y_map = data.y_test[:N_MAP] if data.y_test is not None else None
    paths = {i.stage: i.path for ins in ctx.inputs.values() for i in ins}
    names = [i.stage for i in ctx.inputs["models"]] + [s for g in cfg.guidance for s in (g.main, g.guide) if s]
    loaded = {s: load_model(paths[s], device) for s in dict.fromkeys(names)}
    rows = [(i.stage, loaded[i.stage]) for i in ctx.inputs["models"]]
    rows += [(g.row, AtW(g, loaded) if g.kind == "w" else Guided(g, loaded)) for g in cfg.guidance]
    for row, model in rows:
        is_teacher = model.meta["method"] == "edm"
        nfes = cfg.teacher_nfe if is_teacher else cfg.nfe
        results[row], curves[row] = {}, {}
        for nfe in nfes:
            cache: dict[int, torch.Tensor] = {}
            gen_s = [0.0]  # seconds spent generating (samples/s in the manifest's timing, for `fastgen report`)

            def samples_fn(seed, nfe=nfe, cache=cache, model=model, gen_s=gen_s):
                t_gen = time.perf_counter()
                cache[seed] = _generate(model, n, nfe, seed, labels, device, cfg.sample_batch)
                gen_s[0] += time.perf_counter() - t_gen
                return cache[seed]

            stats = M.with_floor(metric_fn, samples_fn, real_pool, n, cfg.seeds, floor=floor_per_seed)
            used = teacher_nfe(nfe) if is_teacher else nfe
            key = f"nfe_{used}"
            results[row][key] = {m: {k: round(v, 6) for k, v in s.items()} for m, s in stats.items()}
            if cfg.class_groups and labels is not None and data.is_image:
                results[row][f"groups_{key}"] = _group_fd(cfg.class_groups, cache, labels, feats, data, cfg.seeds,
                                                          group_floors)
            curves[row][used] = (stats[prim]["mean"], stats[prim]["std"])
            if "precision" in stats:
                pr_points.setdefault(row, {})[used] = (stats["precision"]["mean"], stats["recall"]["mean"])
            ctx.timing.setdefault("samples_per_s", {}).setdefault(row, {})[key] = round(
                n * len(cfg.seeds) / max(gen_s[0], 1e-9), 1)
            np.savez_compressed(ctx.out / "samples" / f"{row}_nfe{used}.npz",
                                **{f"seed{s}": cache[s].numpy() for s in cfg.seeds})
            panels[f"{row} ({used} NFE)"] = cache[cfg.seeds[0]].numpy()
            print(f"[evaluate] {row} nfe={used}: " + ", ".join(
                f"{m}={s['mean']:.4g}±{s['std']:.2g} (floor {s['floor_mean']:.4g})" for m, s in stats.items()),
                file=sys.stderr)
        if isinstance(model, Guided):
            continue
        if pair_sets:
            results[row]["coupling"] = _coupling(model, _own_pairs(model, pair_sets), nfes, is_teacher, device,
                                                 cfg.sample_batch)
        if not is_teacher and hasattr(model.method, "invert"):
            results[row]["inversion"] = _inversion(model, x_map, y_map, nfes, device, cfg.sample_batch)
        if not is_teacher and hasattr(model.method, "trajectory"):
            y_traj = labels[cfg.seeds[0]] if labels is not None else None
            results[row]["straightness"], traj = _straightness(model, y_traj, nfes, device, cfg.sample_batch)
            if traj and not data.is_image and data.shape == (2,):
                paths_2d[f"{row} ({max(traj)} steps)"] = traj[max(traj)].numpy()
        for part in ("coupling", "inversion", "straightness"):
            if part in results[row]:
                print(f"[evaluate] {row} {part}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[row][part].items()),
                      file=sys.stderr)
    (ctx.out / "metrics.json").write_text(json.dumps(results, indent=2))
    if cfg.plots:
        from fastgen_core import plots  # matplotlib only where plots are drawn (~0.5 s per stage process)

        floor = float(np.mean([f[prim] for f in floor_per_seed]))
        plots.quality_vs_nfe(curves, floor, prim, ctx.out / "plots" / "quality_vs_nfe.png",
                             recipe=f"{recipe.name} / {ctx.name}")
        if pr_points:
            pr_floor = tuple(float(np.mean([f[m] for f in floor_per_seed])) for m in ("precision", "recall"))
            plots.precision_recall(pr_points, pr_floor, ctx.out / "plots" / "precision_recall.png",
                                   recipe=f"{recipe.name} / {ctx.name}", k=cfg.pr_k)
        if data.is_image:
            for title, s in panels.items():
                plots.image_grid(s, ctx.out / "plots" / f"{title.split()[0]}_{title.split('(')[1].split()[0]}nfe.png", title)
        else:
            plots.scatter_2d(panels, data.x_test.numpy(), ctx.out / "plots" / "samples.png")
            if paths_2d:
                plots.trajectories_2d(paths_2d, data.x_test.numpy(), ctx.out / "plots" / "trajectories.png")
        for p in sorted((ctx.out / "plots").iterdir()):
            ctx.tracker.log_artifact(p, "plots")
    ctx.tracker.log_artifact(ctx.out / "metrics.json")
    flat = {f"{m}.{k}.{name}": s["mean"] if isinstance(s, dict) else s
            for m, r in results.items() for k, d in r.items() for name, s in d.items()}
    ctx.tracker.log_metrics(0, flat)
    ctx.metrics = flat if inception_status is None else {**flat, "inception_fid_status": inception_status}

