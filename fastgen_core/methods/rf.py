"""Rectified flow and reflow (Liu, Gong & Liu 2023; docs/methods.md §13). Process `flow` (§0):

    x_t = t·x1 + (1 − t)·z0,   t = 1 data x1, t = 0 standard-normal noise z0,

a velocity network v_θ(x_t, t) regresses the straight-line velocity of a coupling (z0, x1):

    L = E_{t, (z0, x1)} ‖v_θ(x_t, t) − (x1 − z0)‖²,   t ~ U[ε_t, 1]                (RF Eq. 1)

- 1-RF: independent couplings, z0 ~ N(0, I) drawn afresh for each data batch (or the process's
  `source` mixture: mixture → mixture, `noise.Flow`).
- k-RF (reflow, input `pairs`): the deterministic couplings (z0, Z1) of the previous flow's ODE,
  z0 the pair set's standard-normal `noise`, x1 its `sample`; the network starts from the previous
  flow (input `teacher`, `init_from_teacher`).
- distillation to one step (`t_schedule: t0`): the same loss with t fixed at ε_t, i.e.
  ‖z0 + v_θ(z0, ε_t) − x1‖² on the pairs (RF code's `t0` schedule with the l2 loss; LPIPS at scale).

Network: v_θ(x_t, t) = F_θ(x_t, t), no preconditioning, time label t itself ([ours]: RF's NCSN++
gets t·999 for its sinusoidal embedding; our Fourier features expect O(1) labels).

Samplers. Euler (`sample`, `trajectory`): N steps at t_i = i/N·(1 − ε_t) + ε_t (the process's grid)
with step 1/N, x ← x + v(x, t_i)/N, starting at x = z0; one step is z1 = z0 + v(z0, ε_t). RK45
(`ode_solve(..., solver="rk45")`): scipy's adaptive Dormand–Prince on the flattened batch from
t = ε_t to 1 with rtol = atol = 1e-5, the RF code's sampler for reflow pairs; it spends as many
evaluations as the tolerance needs, so it is the pair stage's solver, not an NFE-budget sampler.
Inversion (`invert`): the same Euler steps backwards from x1 at t = 1 to t = ε_t.
An EDM teacher view of a flow model (`denoiser`): x̂1 = x_t + (1 − t)·v (noise.py's velocity_to_x0).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..artifacts import tensors_digest
from ..config import Strict
from .base import Method as _Base
from .base import Role
from .common import col, condition, distance, network_settings, per_sample


class Config(Strict):
    """Rectified flow's settings (docs/methods.md §13)."""

    name: Literal["rf"] = "rf"
    t_schedule: Literal["uniform", "t0"] = Field(
        "uniform", description="training times: uniform: t ~ U[eps_t, 1] (1-RF, k-RF); t0: t = eps_t, one-step "
        "distillation on the pairs (needs a `pairs` input)")
    metric: Literal["l2", "pseudo_huber"] = Field("l2", description="distance of the regression (l2: RF's loss)")
    init_from_teacher: bool = Field(True, description="start from the `teacher` input's weights (the previous flow)")


# ----------------------------------------------------------------------------- the flow

def velocity(net, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
    """v_θ(x_t, t): the network with time label t."""
    return net(x_t, per_sample(t, x_t), **cond)


def interpolate(z0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·x1 + (1 − t)·z0 (process `flow`, data at t = 1)."""
    return col(t, x1) * x1 + col(1 - t, x1) * z0


def euler_times(noise, nfe: int) -> list[float]:
    """The N = nfe evaluation times t_i = i/N·(1 − ε_t) + ε_t of RF's Euler sampler (the grid without its end)."""
    return noise.grid(nfe)[:-1].tolist()


@torch.no_grad()
def euler_path(v, z: torch.Tensor, times: list[float], dt: float, **cond) -> torch.Tensor:
    """x_0 = z, x_{i+1} = x_i + dt·v(x_i, t_i); returns every x_i, shape (len(times) + 1, *z.shape).
    dt < 0 runs the flow backwards (inversion)."""
    xs = [z]
    for t in times:
        xs.append(xs[-1] + dt * v(xs[-1], t, **cond))
    return torch.stack(xs)


@torch.no_grad()
def rk45(v, z: torch.Tensor, t0: float, t1: float = 1.0, rtol: float = 1e-5, atol: float = 1e-5,
         **cond) -> tuple[torch.Tensor, int]:
    """Solve dx/dt = v(x, t) from x(t0) = z to t1 with scipy's RK45 (Dormand–Prince, adaptive) on the
    flattened batch, as RF's code does; returns (x(t1), number of evaluations)."""
    from scipy.integrate import solve_ivp

    shape, dev = z.shape, z.device

    def f(t, y):
        x = torch.from_numpy(y).reshape(shape).to(dev, torch.float32)
        return v(x, float(t), **cond).double().cpu().numpy().reshape(-1)

    sol = solve_ivp(f, (t0, t1), z.double().cpu().numpy().reshape(-1), method="RK45", rtol=rtol, atol=atol)
    return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(dev, z.dtype), int(sol.nfev)


def _v(model):
    net = model.nets["net"]
    return lambda x, t, **cond: velocity(net, x, t, **cond)


# ----------------------------------------------------------------------------- method

class Method(_Base):
    roles = {
        "pairs": Role("pairs", required=False,
                      description="deterministic couplings (noise, sample, label) of an ode_pairs stage: k-RF or distillation"),
        "teacher": Role("model", required=False, method="rf",
                        description="the previous flow, whose weights k-RF starts from"),
    }

    processes = ("flow",)

    @classmethod
    def required_roles(cls, cfg: Config) -> set[str]:
        return {"pairs"} if cfg.t_schedule == "t0" else set()

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        teacher = ctx.inputs.get("teacher")
        init = teacher.nets["net"] if teacher is not None and cfg.init_from_teacher else None
        self.add_net("net", network_settings(ctx, teacher), init_from=init)
        self.pairs = ctx.inputs.get("pairs")

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.pairs is None:  # 1-RF: data; the noise is drawn per batch
            return super().tensors()
        d = {"z": self.pairs["noise"].float(), "x": self.pairs["sample"].float()}
        if self.ctx.data.num_classes > 0:
            d["y"] = self.pairs["label"].long()
        return d

    def loss(self, group, batch, step):
        x1, cond = batch["x"], condition(self.labels(batch))
        z0 = batch["z"] if "z" in batch else self.ctx.noise.draw_like(x1)
        noise = self.ctx.noise
        if self.cfg.t_schedule == "t0":
            t = torch.full((x1.shape[0],), noise.eps_t, device=x1.device)
        else:
            t = noise.sample_t(x1.shape[0], device=x1.device)
        v = velocity(self.nets["net"], interpolate(z0, x1, t), t, **cond)
        return distance(v.float(), (x1 - z0).float(), self.cfg.metric).mean(), {}

    def meta(self) -> dict:
        """The digest of the couplings trained on (`artifacts.tensors_digest` of noise, sample,
        label), so a model tells which pair set it was reflowed on."""
        if self.pairs is None:
            return {"couplings": "independent"}
        return {"couplings": "pairs", "pairs_digest": pairs_digest(self.pairs)}


def pairs_digest(pairs: dict) -> str:
    """Content digest of a pair set (noise, sample, label), as `stages/ode_pairs.py` records it."""
    return tensors_digest(*(torch.as_tensor(np.asarray(pairs[k])) for k in ("noise", "sample", "label")))


# ----------------------------------------------------------------------------- sampling

def sample(model, z, nfe, class_labels=None):
    """Euler with N = nfe steps from z0 = z (standard normal)."""
    return trajectory(model, z, nfe, class_labels)[-1]


def trajectory(model, z, nfe, class_labels=None) -> torch.Tensor:
    """The Euler path x_0 = z, …, x_N (shape (nfe + 1, n, ...)) at times ε_t, t_1, …, 1."""
    return euler_path(_v(model), z, euler_times(model.noise, nfe), 1.0 / nfe, **condition(class_labels))


def invert(model, x, nfe, class_labels=None) -> torch.Tensor:
    """Data → noise: Euler backwards from x1 = x over the sampler's times in reverse, step −1/N."""
    times = euler_times(model.noise, nfe)[::-1]
    times = [model.noise.t_data] + times[:-1]  # x_N sits at t = 1; step i evaluates at its start
    return euler_path(_v(model), x, times, -1.0 / nfe, **condition(class_labels))[-1]


def ode_solve(model, z, solver: Literal["euler", "rk45"] = "rk45", steps: int = 100, class_labels=None,
              rtol: float = 1e-5, atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """The flow's ODE solution from z0 = z: RK45 (RF's reflow pairs) or Euler with `steps` steps;
    returns (x1, evaluations spent)."""
    if solver == "euler":
        return sample(model, z, steps, class_labels), steps
    return rk45(_v(model), z, model.noise.eps_t, 1.0, rtol, atol, **condition(class_labels))


def denoiser(model):
    """The flow as an EDM x0-predictor D(x, σ) (a teacher for EDM-convention students): in flow time
    x̂1(x_t, t) = x_t + (1 − t)·v_θ(x_t, t) (`noise.Flow.velocity_to_x0`), moved to EDM by `to_edm_denoiser`."""
    net, P = model.nets["net"], model.noise
    return P.to_edm_denoiser(lambda x_t, t, **cond: P.velocity_to_x0(x_t, t, velocity(net, x_t, t, **cond)))
