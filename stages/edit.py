"""Stage `edit`: zero-shot editing (inpainting, super-resolution, colorization) of held-out test
images with any consistency-type model (CM Alg. 4, `fastgen_core.editing`).

Input: `model` (a cd / ct / scm / ctm / ayf stage: any method whose module has `consistency_fn`).
Settings: `edit` (`EditConfig` below): task, mask, k, n_images, steps, seed.
Outputs: `edited.npz` (truth, observed, edited, baseline; mask for inpainting; edited_mean with
`samples` > 1), `metrics.json` (MSE/PSNR against the truth on the unknown coordinates and on all
pixels of one edit per image, of the mean of `samples` edits, and of a naive baseline; and
`known_max_abs_change`: how far editing moved the known pixels / patch means /
luminance, float rounding only) and `plots/edit.png` (truth | observed | edited | mean | baseline).
CLI: python -m stages.run RECIPE.yaml STAGE, or `fastgen edit` on a model folder (stages/cli.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pydantic import Field

from fastgen_core import editing as E
from fastgen_core.config import SEED_MAX, Strict
from fastgen_core.data import cached_data
from fastgen_core.methods import available_methods, get_method

from .spec import Problem, StageError, StageSpec, one_input, sample_shape

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
    seed: int = Field(0, ge=0, lt=SEED_MAX, description="seed of the noise (and of a random mask)")
    plots: bool = Field(True, description="write a truth | observed | edited | [mean] | baseline image grid")


class Spec(StageSpec):
    """Zero-shot editing with the consistency-type model of input `model`."""

    kind: Literal["edit"]
    edit: EditConfig = Field(default_factory=EditConfig, description="task, mask, steps, images")

    def problems(self, recipe, name: str) -> list[Problem]:
        """One `model` input trained by a consistency-type method (one whose module has
        `consistency_fn`); image data; colorization on RGB data."""
        model = one_input(self, "model")
        if model is None or set(self.inputs) != {"model"}:
            return [(f"stages.{name}.inputs.model", "an edit stage needs one model stage as input `model`")]
        probs = []
        mname = recipe.model_method(model)
        if model in recipe.stages and (mname not in available_methods()
                                       or not hasattr(get_method(mname), "consistency_fn")):
            probs.append((f"stages.{name}.inputs.model", f"stage {model!r} ({recipe.stages[model].kind}, method "
                          f"{mname!r}) is not a consistency-type model: editing needs one with consistency_fn "
                          f"({', '.join(m for m in available_methods() if hasattr(get_method(m), 'consistency_fn'))})"))
        if recipe.data.kind == "toy":
            probs.append((f"stages.{name}.kind", "editing needs image data (data.kind digits or images), not toy"))
        elif self.edit.task == "colorize" and sample_shape(recipe.data)[0] not in (3, None):
            probs.append((f"stages.{name}.edit.task", "colorize needs RGB data (e.g. data.color: true for digits)"))
        side = sample_shape(recipe.data)[-1]
        if self.edit.task == "superres" and side is not None and recipe.data.kind != "toy" and side % self.edit.k:
            probs.append((f"stages.{name}.edit.k", f"superres patches of {self.edit.k}×{self.edit.k} do not tile "
                          f"the {side}×{side} images"))
        return probs



def consistency_of(model, where: str):
    """The model's f(x, σ), or a StageError naming `where` if its method has none."""
    fn = getattr(model.method, "consistency_fn", None)
    if fn is None:
        raise StageError(f"{where}: method {model.meta['method']!r} has no consistency_fn "
                         "(editing needs a consistency-type model: cd, ct, scm, ctm, ayf)")
    return fn(model)


def check_images(model, truth: torch.Tensor, cfg: EditConfig, where: str) -> None:
    """Shape checks with one-line errors naming `where`."""
    if truth.ndim != 4 or tuple(truth.shape[1:]) != model.shape:
        raise StageError(f"{where}: images of shape {tuple(truth.shape[1:])} but the model makes {model.shape}")
    if cfg.task == "colorize" and truth.shape[1] != 3:
        raise StageError(f"{where}: colorize needs RGB images (3 channels), got {truth.shape[1]}")
    if cfg.task == "superres" and (truth.shape[2] % cfg.k or truth.shape[3] % cfg.k):
        raise StageError(f"{where}: superres k={cfg.k} does not divide the image size {tuple(truth.shape[2:])}")


def edit_images(model, truth: torch.Tensor, labels: torch.Tensor | None, cfg: EditConfig, device,
                where: str = "model") -> tuple[dict[str, np.ndarray], dict]:
    """Degrade `truth` (N, C, H, W) in [-1, 1] as `cfg` says, edit it back with the model's f, and
    score edited and baseline against the truth. Returns (arrays for edited.npz, metrics)."""
    f = consistency_of(model, where)
    check_images(model, truth, cfg, where)
    n, c, h, w = truth.shape
    g = torch.Generator().manual_seed(cfg.seed)
    mask = E.make_mask(cfg.mask, n, h, w, cfg.fraction, g) if cfg.task == "inpaint" else None
    task = E.make_task(cfg.task, truth, mask, cfg.k)
    zs = [torch.randn(truth.shape, generator=g) for _ in range(cfg.samples)]
    taus = model.noise.karras_sigmas(cfg.steps + 1)[:-1].tolist()
    cond = {"class_labels": labels.to(device)} if model.num_classes > 0 and labels is not None else {}
    op = E.Operator(task.operator.forward, task.operator.inverse, task.operator.known.to(device))
    y = task.observed.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the later noises z_n of Alg. 4
        edits = [E.edit(f, y, op, taus, model.noise.sigma_min, z.to(device), **cond).float().cpu() for z in zs]
    edited = edits[0]
    mean = torch.stack(edits).mean(0) if cfg.samples > 1 else None
    metrics = {**E.edit_metrics(task, edited, truth, mean), "steps": cfg.steps, "samples": cfg.samples}
    arrays = {"truth": truth.numpy(), "observed": task.observed.numpy(), "edited": edited.numpy(),
              "baseline": task.baseline.numpy()}
    if mean is not None:
        arrays["edited_mean"] = mean.numpy()
    if mask is not None:
        arrays["mask"] = mask.numpy()
    return arrays, metrics


def plot(arrays: dict[str, np.ndarray], path: Path, title: str, n: int = 10) -> None:
    """Rows: truth, observed, edited, mean of the edits (if several), baseline (the first n images)."""
    from fastgen_core import plots

    keys = [k for k in ("truth", "observed", "edited", "edited_mean", "baseline") if k in arrays]
    rows = [arrays[k][:n] for k in keys]
    names = " | ".join({"edited_mean": "mean"}.get(k, k) for k in keys)
    plots.image_grid(np.concatenate(rows), path, f"{title}\n{names}", nrow=len(rows[0]))


def summary(metrics: dict) -> str:
    e, b = metrics["edited"], metrics["baseline"]
    mean = f", mean of {metrics['samples']} {metrics['edited_mean']['mse_unknown']:.4g}" if "edited_mean" in metrics else ""
    return (f"{metrics['task']}: mse_unknown {e['mse_unknown']:.4g}{mean} (baseline {b['mse_unknown']:.4g}), "
            f"psnr_all {e['psnr_all']:.2f} dB (baseline {b['psnr_all']:.2f}), "
            f"known part moved ≤ {metrics['known_max_abs_change']:.2g}")


def run(ctx) -> None:
    from fastgen_core.models import load_model

    cfg, recipe = ctx.spec.edit, ctx.recipe
    data = cached_data(recipe.data)
    if not data.is_image:
        raise StageError(f"{recipe.path}: data.kind: editing needs image data, not {recipe.data.kind!r}")
    n = min(cfg.n_images, len(data.x_test))
    truth = data.x_test[:n]
    labels = data.y_test[:n] if data.y_test is not None else None
    model = load_model(ctx.input("model").path, ctx.device)
    arrays, metrics = edit_images(model, truth, labels, cfg, ctx.device,
                                  where=f"{recipe.path}: stages.{ctx.name}.inputs.model")
    np.savez_compressed(ctx.out / "edited.npz", **arrays)
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[edit] {ctx.name} {summary(metrics)}", file=sys.stderr)
    ctx.tracker.log_artifact(ctx.out / "metrics.json")
    if cfg.plots:
        (ctx.out / "plots").mkdir()
        plot(arrays, ctx.out / "plots" / "edit.png", f"{cfg.task} with {ctx.input('model').stage}")
        ctx.tracker.log_artifact(ctx.out / "plots" / "edit.png", "plots")
    flat = {f"{part}.{k}": v for part in ("edited", "edited_mean", "baseline") for k, v in metrics.get(part, {}).items()}
    flat["known_max_abs_change"] = metrics["known_max_abs_change"]
    flat.update({f"saturation.{k}": v for k, v in metrics.get("saturation", {}).items()})
    ctx.tracker.log_metrics(0, flat)
    ctx.metrics = flat


#----------------------------------------------------------------------------
# `fastgen edit`: the same editing on a model folder, outside any recipe.


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would add a usage block)
        print(f"fastgen edit: error: {message}", file=sys.stderr)
        sys.exit(2)


def _cli_images(a, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The true images (and labels, if any) from --images FILE.npz or the model's --from-test split."""
    if a.images is not None:
        try:
            with np.load(a.images) as z:
                key = next((k for k in ("images", "truth") if k in z.files), None)
                if key is None:
                    raise StageError(f"--images {a.images}: no array named 'images' (or 'truth') in it "
                                     f"(has: {', '.join(z.files) or 'nothing'})")
                x = torch.from_numpy(z[key]).float()
                y = torch.from_numpy(z["labels"]).long() if "labels" in z.files else None
        except (OSError, ValueError) as e:
            raise StageError(f"--images {a.images}: cannot read as .npz ({e})") from None
        return x, y
    from fastgen_core.config import DataConfig
    from fastgen_core.data import load_data

    try:
        manifest = json.loads((Path(a.model) / "manifest.json").read_text())
        data = load_data(DataConfig.model_validate({k: v for k, v in manifest["data"].items() if k != "digest"}))
    except (OSError, KeyError, ValueError) as e:
        raise StageError(f"--from-test: --model {a.model}: no usable data settings in manifest.json ({e})") from None
    n = min(a.from_test, len(data.x_test))
    return data.x_test[:n], (data.y_test[:n] if data.y_test is not None else None)


def cli(argv: list[str] | None = None) -> int:
    """fastgen edit --model DIR --task T [--mask M] [--k K] (--images F.npz | --from-test N) --out OUT.npz"""
    ap = _Parser(prog="fastgen edit", description="Zero-shot editing with a consistency-type model folder: "
                 "degrade the given true images, edit them back, write OUT.npz (truth, observed, edited, "
                 "baseline[, mask]) and print the metrics as JSON.")
    ap.add_argument("--model", required=True, help="model folder (model.json + model.safetensors) of a cd/ct/scm/ctm/ayf stage")
    ap.add_argument("--task", required=True, help=f"one of {', '.join(E.TASKS)}")
    ap.add_argument("--mask", default="left_half", help=f"inpaint: {', '.join(E.MASKS)}")
    ap.add_argument("--fraction", type=float, default=0.5, help="inpaint with --mask random: fraction to fill")
    ap.add_argument("--k", type=int, default=2, help="superres: patch size")
    ap.add_argument("--steps", type=int, default=4, help="model evaluations")
    ap.add_argument("--samples", type=int, default=1, help="edits per image; >1 also scores their mean")
    ap.add_argument("--seed", type=int, default=0)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help=".npz with 'images' (N, C, H, W) in [-1, 1] and optional 'labels'")
    src.add_argument("--from-test", type=int, metavar="N", help="the first N test images of the model's data")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--metrics", help="also write the metrics to this JSON file")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported in one line
        return int(e.code or 0)
    from pydantic import ValidationError

    from fastgen_core.models import load_model

    try:
        if a.from_test is not None and a.from_test <= 0:
            raise StageError(f"--from-test: must be a positive number of images, got {a.from_test}")
        try:
            cfg = EditConfig(task=a.task, mask=a.mask, fraction=a.fraction, k=a.k, steps=a.steps, seed=a.seed,
                             samples=a.samples,
                             n_images=a.from_test or 1)
        except ValidationError as e:
            err = e.errors()[0]
            raise StageError(f"--{err['loc'][0]}: {err['msg']}") from None
        for flag, out in (("--out", a.out), ("--metrics", a.metrics)):
            if out and not Path(out).resolve().parent.is_dir():
                raise StageError(f"{flag} {out}: its folder does not exist")
            if out and Path(out).is_dir():
                raise StageError(f"{flag} {out}: is a folder, not a file name")
        if not (Path(a.model) / "model.json").is_file():
            raise StageError(f"--model {a.model}: not a model folder (no model.json)")
        try:
            model = load_model(a.model)
        except (OSError, ValueError, KeyError) as e:
            raise StageError(f"--model {a.model}: cannot load the model ({type(e).__name__}: {e})") from None
        consistency_of(model, f"--model {a.model}")
        truth, labels = _cli_images(a, model)
        if model.num_classes > 0 and labels is None:
            raise StageError(f"--images {a.images}: the model is class-conditional: give 'labels' in the file")
        where = f"--images {a.images}" if a.images is not None else f"--model {a.model}"
        arrays, metrics = edit_images(model, truth, labels, cfg, torch.device("cpu"), where=where)
    except StageError as e:
        print(f"fastgen edit: error: {e}", file=sys.stderr)
        return 2
    writes = [(Path(a.out), lambda f: np.savez_compressed(f, **arrays))]
    if a.metrics:
        writes.append((Path(a.metrics), lambda f: f.write(json.dumps(metrics, indent=2).encode())))
    _write_atomic(writes)
    print(json.dumps(metrics))
    print(f"[edit] {summary(metrics)}; wrote {a.out}", file=sys.stderr)
    return 0


def _write_atomic(writes: list[tuple[Path, object]]) -> None:
    """Write every (path, write(file)) to a temporary file next to it, then rename them all: a
    failure in any write leaves none of them (and no temporary file)."""
    tmps = [path.with_name(f".{path.name}.partial") for path, _ in writes]
    try:
        for tmp, (_, write) in zip(tmps, writes):
            with open(tmp, "wb") as f:
                write(f)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, (path, _) in zip(tmps, writes):
        tmp.replace(path)

