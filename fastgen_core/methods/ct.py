"""Consistency training (Song et al. 2023, "Consistency Models", §5 and Alg. 3; docs/methods.md §1).

No teacher: the teacher's ODE step of CD is replaced by the same noise added at the next level,

    k-th iteration:  N = N(k),  σ_0 = σ_max > … > σ_{N−1} = ε  (Karras grid of N(k) levels),
    i ~ U{0..N−2},  z ~ N(0, I),
    L = d(f_θ(x + σ_i·z, σ_i), stopgrad f_θ⁻(x + σ_{i+1}·z, σ_{i+1}))

with the paper's step schedule N(·) and target-EMA schedule μ(·) (Alg. 3):

    N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1,     μ(k) = exp(s0·ln μ0 / (N(k) − 1)),
    θ⁻ ← μ(k)·θ⁻ + (1 − μ(k))·θ  after every step (not the evaluation EMA).

μ(k) divides by N(k) − 1, the step count before the final +1, as openai/consistency_models'
`create_ema_and_scales_fn` (docs/methods.md §1): μ(0) = μ0^{s0/(s0−1)}, 0.81 for μ0 = 0.9, s0 = 2.

CIFAR defaults s0 = 2, s1 = 150, μ0 = 0.9. K (the number of iterations the schedule spans) is the
stage's `train.steps` unless set. The consistency function and the multistep sampler are the ones
of `cd` (f(x, ε) = x exactly). The student trains from scratch: its network comes from the stage's
`network` (a `teacher` input, if given, only supplies the network settings when `network` is
omitted and is otherwise unused).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..config import Strict
from . import cd
from .base import Method as _Base
from .base import Role
from .common import Metric, add_target, col, distance, network_settings, new_seed, same_randomness, update_target


class Config(Strict):
    name: Literal["ct"] = "ct"
    s0: int = Field(2, ge=2, description="initial number of discretisation levels N(0)")
    s1: int = Field(150, ge=2, description="final number of discretisation steps: N(K) = s1 + 1")
    mu0: float = Field(0.9, gt=0, lt=1, description="target EMA scale: μ(k) = exp(s0·ln μ0 / (N(k) − 1)) (openai/consistency_models)")
    K: int | None = Field(None, gt=0, description="iterations over which N(k) grows from s0 to s1 + 1 (None: the stage's train.steps)")
    metric: Metric = Field("l2", description="distance d (as cd)")


def N_k(k: int, K: int, s0: int, s1: int) -> int:
    """Step schedule N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1 (N(0) = s0, N(K) = s1 + 1)."""
    k = min(max(k, 0), K)
    return int(math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)) + 1


def mu_k(k: int, K: int, s0: int, s1: int, mu0: float) -> float:
    """Target-network EMA μ(k) = exp(s0·ln μ0 / (N(k) − 1)), N(k) − 1 the number of steps (≥ 1 as s0 ≥ 2)."""
    return math.exp(s0 * math.log(mu0) / (N_k(k, K, s0, s1) - 1))


class Method(_Base):
    roles = {"teacher": Role("model", required=False,
                             description="only supplies the network settings when the stage has no `network`")}

    @classmethod
    def settings_problems(cls, cfg: Config, train) -> list[tuple[str, str]]:
        if cfg.K is None and train.steps <= 0:
            return [("method.K", "K (the iterations N(k) grows over) defaults to train.steps, which is 0: "
                     "give train.steps > 0 or set K")]
        return []

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        self.K = cfg.K if cfg.K is not None else ctx.steps
        if self.K <= 0:
            raise ValueError("ct: K (the iterations the N(k) schedule spans) is the stage's train.steps: give "
                             "train.steps > 0 (Context.steps) or set K")
        net_cfg = network_settings(ctx, ctx.inputs.get("teacher"))
        self.add_net("net", net_cfg)
        add_target(self, net_cfg)
        self.f = cd.ConsistencyFn(self.nets["net"], ctx.noise)
        self.f_target = cd.ConsistencyFn(self.nets["target"], ctx.noise)

    def N(self, step: int) -> int:
        c = self.cfg
        return N_k(step, self.K, c.s0, c.s1)

    def mu(self, step: int) -> float:
        c = self.cfg
        return mu_k(step, self.K, c.s0, c.s1, c.mu0)

    def loss(self, group, batch, step):
        x, y = batch["x"], self.labels(batch)
        N = self.N(step)
        sigmas = self.ctx.noise.karras_sigmas(N).to(x.device)
        i = torch.randint(N - 1, (x.shape[0],), device=x.device)
        s_i, s_next = sigmas[i], sigmas[i + 1]
        z = torch.randn_like(x)
        seed = new_seed()
        with same_randomness(seed, x):  # online and target passes share the dropout mask
            online = self.f(x + col(s_i, x) * z, s_i, class_labels=y)
        with torch.no_grad(), same_randomness(seed, x):
            target = self.f_target(x + col(s_next, x) * z, s_next, class_labels=y)
        return distance(online, target, self.cfg.metric).mean(), {"N": N}

    def after_step(self, step):
        update_target(self.nets["target"], self.nets["net"], self.mu(step))


# The same consistency function and multistep sampler as CD.
consistency_fn, sample = cd.consistency_fn, cd.sample
