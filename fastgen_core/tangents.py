"""Shared machinery of the continuous-time consistency / flow-map objectives (sCM, AYF):
time derivatives of a network along a direction by ONE forward-mode JVP (or a central finite
difference where JVPs are unsupported, every pass under the same dropout mask as the forward
pass: `methods.common.same_randomness`), tangent normalisation and warmup.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Literal, Sequence

import torch

from .methods.common import same_randomness
from .noise import col


def jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
        mode: Literal["func", "fd"] = "func", eps: float = 1e-3,
        seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), ∂fn(*primals)·tangents), without gradients.

    mode "func": one `torch.func.jvp` (forward-mode AD, exact).
    mode "fd":   central difference [fn(p + ε·v) − fn(p − ε·v)] / (2ε) (error O(ε²)), plus one
                 plain evaluation for the primal output.
    With `seed`, every evaluation runs under `same_randomness(seed)` (same dropout mask as a
    forward pass made under the same seed)."""
    ctx = (lambda: same_randomness(seed, primals[0])) if seed is not None else contextlib.nullcontext
    primals, tangents, fp32 = _full_precision(primals, tangents)
    with torch.no_grad(), fp32:
        if mode == "func":
            with ctx():
                out, d = torch.func.jvp(fn, tuple(primals), tuple(tangents))
            return out, d
        if mode == "fd":
            with ctx():
                out = fn(*primals)
            with ctx():
                plus = fn(*[p + eps * v for p, v in zip(primals, tangents)])
            with ctx():
                minus = fn(*[p - eps * v for p, v in zip(primals, tangents)])
            return out, (plus - minus) / (2 * eps)
    raise ValueError(f"unknown jvp mode {mode!r}")


def _full_precision(primals, tangents):
    """Under mixed-precision autocast (recipe `train.precision: bf16`) derivatives are taken in fp32:
    autocast off, inputs cast to fp32 — forward-mode AD does not cast tangents with autocast (a conv
    then meets bf16 weights with an fp32 tangent), and a central difference with ε = 1e-3 would drown
    in bf16's rounding (8 significant bits). Without autocast nothing changes."""
    device = primals[0].device.type
    if not torch.is_autocast_enabled(device):
        return primals, tangents, contextlib.nullcontext()
    up = lambda ts: tuple(t.float() if t.is_floating_point() else t for t in ts)  # noqa: E731
    return up(primals), up(tangents), torch.autocast(device, enabled=False)


def normalise(g: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """Tangent normalisation g ← g / (‖g‖ + c), the norm taken per sample over all its dims."""
    norm = col(g.flatten(1).norm(dim=1), g)
    return g / (norm + c)


def warmup(step: int, steps: int, r_max: float = 1.0) -> float:
    """Tangent warmup r = r_max·min(1, step / steps) (r = r_max at once when steps = 0)."""
    return r_max if steps <= 0 else r_max * min(1.0, step / steps)
