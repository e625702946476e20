"""A classifier of the training data, trained as its own stage; its penultimate features define
the Fréchet distance (FD) used to evaluate image models without Inception weights."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import NetworkConfig, Strict
from .base import Method as _Base


class Config(Strict):
    name: Literal["classifier"] = "classifier"
    width: int = Field(64, gt=0, description="classifier width")
    augment_noise: float = Field(0.05, ge=0, description="std of Gaussian input noise during training")


class Method(_Base):
    generates = False

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        from ..nets import build_network

        if ctx.data.y is None:
            raise ValueError("the classifier needs labelled data")
        self.n_classes = int(ctx.data.y.max()) + 1
        net_cfg = NetworkConfig(arch="classifier", width=cfg.width)
        self.nets["net"] = build_network(net_cfg, ctx.data.shape, self.n_classes).to(ctx.device)
        self.net_cfgs["net"] = net_cfg

    def tensors(self):
        return {"x": self.ctx.data.x, "y": self.ctx.data.y}

    def loss(self, group, batch, step):
        x = batch["x"] + self.cfg.augment_noise * torch.randn_like(batch["x"])
        logits = self.nets["net"](x)
        return F.cross_entropy(logits, batch["y"]), {"acc": (logits.argmax(1) == batch["y"]).float().mean()}

    def meta(self):
        return {"num_classes": self.n_classes}


def sample(model, z, nfe, class_labels=None):
    raise TypeError("a classifier does not generate samples")
