"""Pieces every method module shares (not a method itself; the registry skips it).

- tensors:   `col` (a per-sample (N,) tensor broadcast against x), `per_sample` (a scalar or (N,)
             time as an (N,) tensor), `condition` (the keyword conditions of a network call);
- networks:  `network_settings` (the stage's network, else the teacher's), `add_target` (a frozen
             copy θ⁻) and `update_target` (θ⁻ ← μ·θ⁻ + (1 − μ)·θ), the two-time student of CTM and
             AYF (`add_two_time_student`: teacher weights, zero s-embedding) and a trained flow map
             as student (`add_trained_student`);
- randomness: `new_seed` and `same_randomness`: online/target passes, or a forward pass and its
             JVP, under the same dropout mask;
- consistency functions: the distance d of the consistency losses (`distance`, `Metric`), the
             multistep sampling levels τ (`multistep_sigmas`), a consistency function of another
             time convention queried in the EDM one (`edm_consistency_fn`);
- settings:  `TangentSettings`, the settings of the tangent-based objectives (sCM, AYF).
The math of each paper stays in its own module.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

from ..config import NetworkConfig, Strict
from ..noise import col, from_edm, to_edm
from ..samplers import per_sample

__all__ = ["col", "per_sample", "condition", "new_seed", "same_randomness", "network_settings", "add_target",
           "update_target", "two_time_net_cfg", "copy_teacher_weights", "add_two_time_student",
           "add_trained_student", "Metric", "distance", "multistep_sigmas", "edm_consistency_fn",
           "TangentSettings"]


def condition(y: torch.Tensor | None) -> dict:
    """The keyword conditions of a network call: {"class_labels": y}, or none for unconditional data."""
    return {} if y is None else {"class_labels": y}


# ----------------------------------------------------------------------------- shared randomness

def new_seed() -> int:
    """A seed drawn from the global generator (so runs stay reproducible under `torch.manual_seed`)."""
    return int(torch.randint(2**62, ()).item())


@contextlib.contextmanager
def same_randomness(seed: int, like: torch.Tensor | None = None):
    """Run the body with the RNG seeded by `seed`, restoring the previous RNG state afterwards
    (that of `like`'s CUDA device too): two passes under the same seed draw the same dropout
    masks (online/target, forward/JVP)."""
    devices = [like.device] if like is not None and like.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- networks

def network_settings(ctx, teacher=None) -> NetworkConfig:
    """The settings of the trained network: the stage's `network`, else the teacher's."""
    if ctx.network is not None:
        return ctx.network
    if teacher is None:
        raise ValueError("without a `teacher` input the stage needs its own `network` settings")
    return teacher.meta_net_cfg("net")


def add_target(method, net_cfg: NetworkConfig) -> nn.Module:
    """Own "target": the network θ⁻, a frozen copy of "net" (moved by `update_target`)."""
    target = method.add_net("target", net_cfg, init_from=method.nets["net"])
    target.requires_grad_(False)
    return target


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, mu: float) -> None:
    """Target-network EMA θ⁻ ← μ·θ⁻ + (1 − μ)·θ (not the loop's evaluation EMA)."""
    for pt, p in zip(target.parameters(), online.parameters()):
        pt.lerp_(p, 1 - mu)


def two_time_net_cfg(net_cfg: NetworkConfig) -> NetworkConfig:
    """A network's settings with the embedding of a second time s switched on (flow maps, CTM)."""
    return net_cfg.model_copy(update={"second_time": True})


def copy_teacher_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Copy the teacher's weights into a two-time student; only the s-embedding may be missing, and
    its projection is zeroed (so the s input has no effect at the start)."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("embed.map_s", "embed.fourier_s")) for k in missing):
        raise ValueError(f"teacher and student networks differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        student.embed.map_s.weight.zero_()
        student.embed.map_s.bias.zero_()


def add_two_time_student(method, teacher, init: bool) -> NetworkConfig:
    """Own the two-time student "net" (the stage's or the teacher's settings + s-embedding),
    optionally starting from the teacher's weights; returns its NetworkConfig."""
    net_cfg = two_time_net_cfg(network_settings(method.ctx, teacher))
    method.add_net("net", net_cfg)
    if init:
        copy_teacher_weights(method.nets["net"], teacher.nets["net"])
    return net_cfg


def add_trained_student(method, student) -> None:
    """Own "net" as a copy of a trained flow map (a model whose network has a second time s)."""
    if not getattr(student.nets["net"].embed, "second_time", False):
        raise ValueError("the `student` input must be a flow map (a network with a second time s), e.g. an ayf stage")
    method.add_net("net", student.meta_net_cfg("net"), init_from=student.nets["net"])


# ----------------------------------------------------------------------------- consistency functions

Metric = Literal["l2", "pseudo_huber"]


def distance(a: torch.Tensor, b: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Per-sample d(a, b) of the consistency losses: mean squared error, or pseudo-Huber
    √(‖a−b‖² + c²) − c with c = 0.00054·√dim (Song & Dhariwal 2023)."""
    diff = (a - b).flatten(1)
    if metric == "l2":
        return (diff**2).mean(1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return ((diff**2).sum(1) + c**2).sqrt() - c


def multistep_sigmas(noise, nfe: int) -> torch.Tensor:
    """The levels τ_0 = σ_max > … > τ_{nfe−1} of `nfe`-step consistency sampling: the Karras grid of
    nfe + 1 levels without its last (Song et al. 2023, Alg. 1)."""
    return noise.karras_sigmas(nfe + 1)[:-1]


def edm_consistency_fn(f: Callable, conv: str, sigma_data: float = 0.5) -> Callable:
    """A consistency function f(x_t, t, **cond) of time convention `conv` as one of the EDM
    convention (x = x0 + σ·n): f_edm(x, σ) = f(a(t)·x, t) at t = t(σ) (`noise.to_edm/from_edm`)."""
    def f_edm(x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        t = from_edm(conv, per_sample(sigma, x), sigma_data)
        return f(col(to_edm(conv, t, sigma_data)[0], x) * x, t, **cond)
    return f_edm


# ----------------------------------------------------------------------------- settings

class TangentSettings(Strict):
    """Settings of the objectives whose target is a normalised tangent g/(‖g‖ + c) with a warmed-up
    derivative term, computed by one JVP (sCM, docs/methods.md §4; AYF, §3)."""

    name: str = Field(..., description="the method")
    jvp: Literal["func", "fd"] = Field("func", description="derivatives by torch.func.jvp, or by a central finite difference")
    fd_eps: float = Field(1e-3, gt=0, description="finite-difference step (jvp: fd)")
    warmup_steps: int = Field(10000, ge=0, description="tangent warmup: the derivative term's factor r rises linearly from 0 over this many steps")
    tangent_c: float = Field(0.1, gt=0, description="tangent normalisation g/(‖g‖ + c)")
