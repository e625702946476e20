"""Typed settings shared by the library: data and networks.

These are leaves of the recipe schema (`stages/recipe.py`, docs/recipes.md) that the library itself
uses: data, networks and the training loop read them without knowing about recipes or stages.
Every number must be finite (YAML's `.nan` and `.inf` are refused), a boolean is not a number
(YAML reads yes/no/on/off as booleans), and a check across fields names the field it blames
(`FieldError`), so a bad recipe is reported as one line naming the field path.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

SEED_MAX = 2**32  # numpy's generators take seeds in [0, 2^32); torch's take more


class FieldError(ValueError):
    """A check across fields of a settings model that blames one of them: `field` is its path
    relative to the model (the recipe's error line appends it to the model's path)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def _numeric(annotation) -> bool:
    """Whether a field's type takes numbers but not booleans (int, float, or one of them | None)."""
    args = [a for a in (get_args(annotation) or (annotation,)) if a is not type(None)]
    return bool(args) and all(a in (int, float) for a in args)


class Strict(BaseModel):
    """Base for every recipe section: unknown fields are errors, not silently ignored; numbers are
    finite; a boolean where a number is expected is an error, not 0 or 1."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
    # settings added after recipes were first digested: left out of the dump while at these values,
    # so the params digest of every stage that does not set them is as it was before they existed
    omit_at_default: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _omit_new_settings_at_default(self, handler):
        out = handler(self)
        if isinstance(out, dict):
            for k, default in self.omit_at_default.items():
                if k in out and out[k] == default:
                    del out[k]
        return out

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, raw):
        for name, v in raw.items() if isinstance(raw, dict) else ():
            f = cls.model_fields.get(name) if isinstance(name, str) else None
            if isinstance(v, bool) and f is not None and _numeric(f.annotation):
                raise FieldError(name, f"a number is needed, not the boolean {str(v).lower()} "
                                 "(YAML reads yes/no/on/off/true/false as booleans)")
        return raw


def distinct(values: list, what: str = "values") -> list:
    """`values` unchanged if no value repeats; else a ValueError naming the repeats."""
    rep = sorted({v for v in values if values.count(v) > 1})
    if rep:
        raise ValueError(f"{what} must not repeat: {', '.join(map(str, rep))} given more than once")
    return values


def seeds_in_range(values: list[int]) -> list[int]:
    """`values` unchanged if every seed lies in 0..SEED_MAX − 1; else a ValueError naming the others."""
    bad = [s for s in values if not 0 <= s < SEED_MAX]
    if bad:
        raise ValueError(f"seeds must lie in 0..2^32 − 1, got {', '.join(map(str, bad))}")
    return values


class DataConfig(Strict):
    kind: Literal["toy", "digits", "images"] = Field(
        "toy", description="toy: 2D distributions with known density; digits: scikit-learn 8x8 digits; "
        "images: an image folder / CIFAR-10 / MNIST from a local or s3:// root")
    name: str = Field(
        "8gaussians",
        description="toy: 8gaussians | checkerboard | labelled_mixture | fractal | triangle; images: folder | cifar10 | mnist")
    n_train: int = Field(20000, gt=0, description="toy: number of training samples drawn")
    n_test: int = Field(5000, gt=0, description="toy: number of held-out ground-truth samples")
    root: str | None = Field(None, min_length=1, description="images: local path or s3:// URI of the data root")
    resolution: int | None = Field(None, gt=0, description="images: resize to this many pixels a side")
    channels: int | None = Field(None, description="images: 1 (grey) or 3 (RGB); None keeps the source's")
    conditional: bool = Field(False, description="use class labels as a condition (class-conditional models)")
    test_fraction: float = Field(0.221, gt=0, lt=1, description="digits/images: held-out fraction (fixed split)")
    split_seed: int = Field(0, ge=0, lt=SEED_MAX, description="seed of the fixed train/test split and of toy sampling")
    color: bool = Field(
        False, description="digits: render each digit in a colour (3 channels): a foreground colour from a "
        "palette of six hues at a random brightness on a black background, drawn per image from split_seed "
        "(the luminance does not determine the colour: for colorization)")

    @field_validator("channels")
    @classmethod
    def _grey_or_rgb(cls, v):
        if v is not None and v not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), not {v}")
        return v

    @model_validator(mode="after")
    def _fields_of_kind(self):
        if self.color and self.kind != "digits":
            raise FieldError("color", f"color applies to kind 'digits' only, not {self.kind!r}")
        for field in ("root", "resolution", "channels"):
            if getattr(self, field) is not None and self.kind != "images":
                raise FieldError(field, f"applies to kind 'images' only, not {self.kind!r}"
                                 + (" (coloured digits: color: true)" if field == "channels" else ""))
        return self


class NetworkConfig(Strict):
    arch: Literal["mlp", "unet", "classifier"] = Field(
        "mlp", description="mlp for vectors, unet for images, classifier for the feature network")
    width: int = Field(256, gt=0, description="mlp: hidden width; unet: base channel count")
    depth: int = Field(4, gt=0, description="mlp: number of hidden residual blocks; unet: res blocks per level")
    channel_mult: list[int] = Field([1, 2], min_length=1, description="unet: channel multiplier per resolution "
                                    "level (each > 0; H and W must be divisible by 2^(levels − 1))")
    emb_dim: int = Field(128, gt=0, description="width of the time/condition embedding")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability")
    second_time: bool = Field(False, description="add an embedding of a second time s (flow maps, CTM)")
    scalar_cond: bool = Field(False, description="add an embedding of a scalar condition (guidance w)")
    cond_channels: int = Field(0, ge=0, description="extra input channels/features concatenated to x (image condition, self-conditioning)")
    layout: Literal["ddpm", "lean"] = Field(
        "ddpm", description="unet: ddpm (the papers' layout: depth + 1 blocks up, two middle blocks, conv "
        "resampling) or lean (depth blocks up, one middle block, pooling; ~2x faster on CPU, docs/design.md)")
    attn_resolutions: list[int] = Field(
        [], description="unet: feature-map sides (e.g. [16]) at which self-attention follows each res block; "
        "each must be a side the network has (H / 2^level)")

    @field_validator("channel_mult")
    @classmethod
    def _positive(cls, v: list[int]):
        if any(m <= 0 for m in v):
            raise ValueError(f"every multiplier must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _attention_sides(self):
        if self.attn_resolutions and self.arch != "unet":
            raise FieldError("attn_resolutions", f"applies to arch unet only, not {self.arch!r}")
        if len(set(self.attn_resolutions)) != len(self.attn_resolutions):
            raise FieldError("attn_resolutions", f"listed more than once: {self.attn_resolutions}")
        if self.attn_resolutions:  # sides of one network are r, r/2, ..., r/2^(levels-1): at most that span
            hi, lo = max(self.attn_resolutions), min(self.attn_resolutions)
            levels = len(self.channel_mult)
            bad = [r for r in self.attn_resolutions if r <= 0 or hi % r or (hi // r) & (hi // r - 1)]
            if bad or hi // lo >= 2**levels:
                raise FieldError("attn_resolutions", f"{self.attn_resolutions} cannot all be feature-map sides of "
                                 f"a unet with {levels} levels (sides H, H/2, ..., H/2^{levels - 1})")
        return self


class TrainConfig(Strict):
    steps: int = Field(2000, ge=0, description="optimisation steps (iterations of the loop)")
    batch_size: int = Field(256, gt=0, description="global batch size, split across workers")
    lr: float = Field(1e-3, gt=0, description="learning rate (methods may scale it per optimiser)")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="optimiser family")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas, each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    grad_clip: float | None = Field(None, gt=0, description="clip gradient norm per optimiser (None: no clipping)")
    lr_warmup: int = Field(0, ge=0, description="linear learning-rate warmup steps (at most steps)")
    lr_schedule: Literal["constant", "linear_decay"] = Field(
        "constant", description="learning rate after the warmup: constant, or linear_decay: annealed linearly to 0 "
        "over the run, lr·(1 − step/steps) at step 0 … steps − 1 (progressive distillation's schedule in each round)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="evaluation EMA decay per step")
    ckpt_every: int = Field(500, gt=0, description="write a resumable checkpoint every this many steps")
    log_every: int = Field(50, gt=0, description="log metrics every this many steps")
    snapshots: list[int] = Field(
        [], description="steps at which the loop keeps a copy of the EMA weights; training stages save them as "
        "model folders snapshots/step_NNNNNN/ (e.g. an early snapshot as an autoguidance guide)")
    snapshot_ema_decay: float | None = Field(
        None, ge=0, lt=1, description="EMA decay of the snapshots (the guide's EMA is tuned separately); "
        "None: snapshot the evaluation EMA")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the method's loss computed under bfloat16 autocast (mixed precision; parameters, "
        "optimiser state and EMA stay fp32; derivatives by jvp/fd stay fp32); fp32: full precision")
    compile: bool = Field(False, description="compile the trained networks with torch.compile (in place; "
                          "state dicts unchanged; the first steps pay the compilation)")
    batch_gpu: int | None = Field(
        None, gt=0, description="most samples a worker passes through the networks at once: each worker's share "
        "of batch_size is split into chunks of this size whose gradients are accumulated before the optimiser "
        "step (EDM's batch_gpu; the gradient of the whole share, less memory); None: the whole share at once")

    omit_at_default = {"precision": "fp32", "compile": False, "lr_schedule": "constant", "batch_gpu": None}  # (Strict)

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, v: tuple[float, float]):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"Adam betas must lie in [0, 1), got {list(v)}")
        return v

    @field_validator("snapshots")
    @classmethod
    def _distinct_snapshots(cls, v: list[int]):
        return distinct(v, "snapshot steps")

    @model_validator(mode="after")
    def _within_run(self):
        bad = [k for k in self.snapshots if not 1 <= k <= self.steps]
        if bad:
            raise FieldError("snapshots", f"snapshots {bad} outside 1..steps = {self.steps}")
        if self.snapshot_ema_decay is not None and not self.snapshots:
            raise FieldError("snapshot_ema_decay", "no snapshots to take: set snapshots, or remove it")
        if self.lr_warmup > self.steps:
            raise FieldError("lr_warmup", f"warmup of {self.lr_warmup} steps is longer than the run "
                             f"(steps = {self.steps}): the learning rate would never reach lr")
        return self
