"""Consistency training (Song et al. 2023, "Consistency Models", §5 and Alg. 3; METHODS.md §1).

No teacher: the teacher's ODE step of CD is replaced by the same noise added at the next level,

    k-th iteration:  N = N(k),  σ_0 = σ_max > … > σ_{N−1} = ε  (Karras grid of N(k) levels),
    i ~ U{0..N−2},  z ~ N(0, I),
    L = d(f_θ(x + σ_i·z, σ_i), stopgrad f_θ⁻(x + σ_{i+1}·z, σ_{i+1}))

with the paper's step schedule N(·) and target-EMA schedule μ(·) (Alg. 3):

    N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1,     μ(k) = exp(s0·ln μ0 / N(k)),
    θ⁻ ← μ(k)·θ⁻ + (1 − μ(k))·θ  after every step (not the evaluation EMA).

CIFAR defaults s0 = 2, s1 = 150, μ0 = 0.9. K (the number of iterations the schedule spans) is a
setting: make it equal to the stage's `train.steps`. The consistency function, the distance and
the multistep sampler are the ones of `cd` (f(x, ε) = x exactly). The student trains from
scratch: its network comes from the stage's `network` (a `teacher` input, if given, only supplies
the network settings when `network` is omitted and is otherwise unused).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..config import Strict
from ..samplers import _col
from ..tangents import new_seed, same_randomness
from . import cd
from .base import Method as _Base


class Config(Strict):
    name: Literal["ct"] = "ct"
    s0: int = Field(2, ge=2, description="initial number of discretisation levels N(0)")
    s1: int = Field(150, ge=2, description="final number of discretisation steps: N(K) = s1 + 1")
    mu0: float = Field(0.9, gt=0, lt=1, description="target EMA at N = s0: μ(k) = exp(s0·ln μ0 / N(k))")
    K: int = Field(10000, gt=0, description="iterations over which N(k) grows from s0 to s1 + 1 (set to train.steps)")
    metric: Literal["l2", "pseudo_huber"] = Field("l2", description="distance d (as cd)")


def N_k(k: int, K: int, s0: int, s1: int) -> int:
    """Step schedule N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1 (N(0) = s0, N(K) = s1 + 1)."""
    k = min(max(k, 0), K)
    return int(math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)) + 1


def mu_k(k: int, K: int, s0: int, s1: int, mu0: float) -> float:
    """Target-network EMA μ(k) = exp(s0·ln μ0 / N(k))."""
    return math.exp(s0 * math.log(mu0) / N_k(k, K, s0, s1))


class Method(_Base):
    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        net_cfg = ctx.network
        if net_cfg is None:
            if "teacher" not in ctx.inputs:
                raise ValueError("ct trains from scratch: give the stage a `network` (or a teacher to copy settings from)")
            net_cfg = ctx.inputs["teacher"].meta_net_cfg("net")
        self.add_net("net", net_cfg)
        self.add_net("target", net_cfg, init_from=self.nets["net"])
        self.nets["target"].requires_grad_(False)
        self.f = cd.ConsistencyFn(self.nets["net"], ctx.noise)
        self.f_target = cd.ConsistencyFn(self.nets["target"], ctx.noise)

    def N(self, step: int) -> int:
        c = self.cfg
        return N_k(step, c.K, c.s0, c.s1)

    def mu(self, step: int) -> float:
        c = self.cfg
        return mu_k(step, c.K, c.s0, c.s1, c.mu0)

    def loss(self, group, batch, step):
        x, y = batch["x"], self.labels(batch)
        N = self.N(step)
        sigmas = self.ctx.noise.karras_sigmas(N).to(x.device)
        i = torch.randint(N - 1, (x.shape[0],), device=x.device)
        s_i, s_next = sigmas[i], sigmas[i + 1]
        z = torch.randn_like(x)
        seed = new_seed()
        with same_randomness(seed, x):  # online and target passes share the dropout mask
            online = self.f(x + _col(s_i, x) * z, s_i, class_labels=y)
        with torch.no_grad(), same_randomness(seed, x):
            target = self.f_target(x + _col(s_next, x) * z, s_next, class_labels=y)
        return cd.distance(online, target, self.cfg.metric).mean(), {"N": N}

    @torch.no_grad()
    def after_step(self, step):
        mu = self.mu(step)
        for pt, p in zip(self.nets["target"].parameters(), self.nets["net"].parameters()):
            pt.lerp_(p, 1 - mu)


# The same consistency function and multistep sampler as CD.
consistency_fn, sample = cd.consistency_fn, cd.sample
