"""Typed settings shared by the library: data and networks.

These are leaves of the recipe schema (`stages/recipe.py`, docs/recipes.md) that the library itself
uses: data, networks and the training loop read them without knowing about recipes or stages.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base for every recipe section: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(Strict):
    kind: Literal["toy", "digits", "images"] = Field(
        "toy", description="toy: 2D distributions with known density; digits: scikit-learn 8x8 digits; "
        "images: an image folder / CIFAR-10 / MNIST from a local or s3:// root")
    name: str = Field(
        "8gaussians",
        description="toy: 8gaussians | checkerboard | labelled_mixture | fractal; images: folder | cifar10 | mnist")
    n_train: int = Field(20000, gt=0, description="toy: number of training samples drawn")
    n_test: int = Field(5000, gt=0, description="toy: number of held-out ground-truth samples")
    root: str | None = Field(None, description="images: local path or s3:// URI of the data root")
    resolution: int | None = Field(None, gt=0, description="images: resize to this many pixels a side")
    channels: int | None = Field(None, gt=0, description="images: 1 (grey) or 3 (RGB); None keeps the source's")
    conditional: bool = Field(False, description="use class labels as a condition (class-conditional models)")
    test_fraction: float = Field(0.221, gt=0, lt=1, description="digits/images: held-out fraction (fixed split)")
    split_seed: int = Field(0, description="seed of the fixed train/test split and of toy sampling")
    color: bool = Field(
        False, description="digits: render each digit in a colour (3 channels): a foreground colour from a "
        "palette of six hues at a random brightness on a black background, drawn per image from split_seed "
        "(the luminance does not determine the colour: for colorization)")

    @model_validator(mode="after")
    def _color_only_for_digits(self):
        if self.color and self.kind != "digits":
            raise ValueError(f"color applies to kind 'digits' only, not {self.kind!r}")
        return self


class NetworkConfig(Strict):
    arch: Literal["mlp", "unet", "classifier"] = Field(
        "mlp", description="mlp for vectors, unet for images, classifier for the feature network")
    width: int = Field(256, gt=0, description="mlp: hidden width; unet: base channel count")
    depth: int = Field(4, gt=0, description="mlp: number of hidden residual blocks; unet: res blocks per level")
    channel_mult: list[int] = Field([1, 2], description="unet: channel multiplier per resolution level")
    emb_dim: int = Field(128, gt=0, description="width of the time/condition embedding")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability")
    second_time: bool = Field(False, description="add an embedding of a second time s (flow maps, CTM)")
    scalar_cond: bool = Field(False, description="add an embedding of a scalar condition (guidance w)")
    cond_channels: int = Field(0, ge=0, description="extra input channels/features concatenated to x (image condition, self-conditioning)")


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
