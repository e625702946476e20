"""The method interface of the one training loop (`fastgen_core.loop.train`).

The hard cases it has to take without special cases in the loop (DESIGN.md): several networks per
method (student, target, fake critic, discriminator, K students), several optimisers at different
rates (DMD2's 5:1), a second time argument, JVPs, extra conditions, a frozen teacher in another
time convention, progressive rounds. The answer:

- `self.nets`   — an `nn.ModuleDict` of every network the method owns and saves (trainable or not).
- `groups()`    — optimiser groups: a name, the parameters it steps, how often (`every`), lr scale.
                  The loop steps group g on iterations where `step % g.every == 0`, calling
                  `loss(g.name, batch, step)` for each; gradients of one group never leak into
                  another's step because each group zeroes and steps only its own parameters.
- `tensors()`   — the training tensors the loop draws minibatches from (data, or ODE pairs).
- `after_step`  — per-iteration bookkeeping (target-network EMA, schedules).
- `export`      — the networks saved as the model (their evaluation-EMA weights).
- frozen inputs (teachers, guides) arrive as loaded models in `ctx.inputs`; a teacher in another
  time convention is wrapped once by `noise.denoiser_in`.
Progressive rounds are separate stages: a round's student is the next round's `teacher` input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Group:
    """One optimiser: the parameters it owns, how often it steps and its learning-rate scale."""

    name: str
    params: list[nn.Parameter]
    every: int = 1
    lr_scale: float = 1.0


@dataclass
class Context:
    """What a method is built from: the data, the noise process, its network settings, its inputs."""

    data: Any                      # fastgen_core.data.Dataset
    noise: Any                     # fastgen_core.noise.EDM
    network: Any = None            # NetworkConfig of the trained network (None: copy the teacher's)
    inputs: dict[str, Any] = field(default_factory=dict)  # role -> LoadedModel | pairs dict
    device: torch.device = torch.device("cpu")
    seed: int = 0


class Method:
    """Base class; see the module docstring."""

    Config: type
    export: tuple[str, ...] = ("net",)

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        self.nets = nn.ModuleDict()
        self.net_cfgs: dict[str, Any] = {}

    def add_net(self, name: str, net_cfg, init_from: nn.Module | None = None) -> nn.Module:
        """Build network `name` from its NetworkConfig (optionally copying weights) and own it."""
        from ..nets import build_network

        net = build_network(net_cfg, self.ctx.data.shape, self.ctx.data.num_classes).to(self.ctx.device)
        if init_from is not None:
            net.load_state_dict(init_from.state_dict())
        self.nets[name], self.net_cfgs[name] = net, net_cfg
        return net

    # --- what the loop calls -------------------------------------------------------------
    def groups(self) -> list[Group]:
        return [Group("net", list(self.nets["net"].parameters()))]

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"x": self.ctx.data.x}
        if self.ctx.data.y is not None and self.ctx.data.num_classes > 0:
            d["y"] = self.ctx.data.y
        return d

    def loss(self, group: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        pass

    # --- helpers for subclasses ----------------------------------------------------------
    def labels(self, batch: dict) -> torch.Tensor | None:
        """Class labels of a batch, or None for unconditional data."""
        return batch.get("y")

    def meta(self) -> dict:
        """Extra facts saved in model.json (besides method, config, networks, shape, noise)."""
        return {}
