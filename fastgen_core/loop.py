"""The one training loop. Every method (teacher DSM, CD, CT, sCM, CTM, DMD2, ...) runs through
`train`: it knows nothing about any method beyond the `methods.base.Method` interface.

Per iteration: draw a minibatch from `method.tensors()`; for each optimiser group due this step
(`step % every == 0`) zero its gradients, compute `method.loss(group)`, backpropagate, average
gradients over workers, clip and step; then update the evaluation EMA and call
`method.after_step`. Checkpoints (`last.pt`, tensors only, loaded with `weights_only=True`) are
written atomically every `ckpt_every` steps and training resumes from them.

Snapshots: at the steps in `cfg.snapshots` the loop keeps a copy of the EMA weights of the
exported networks (e.g. an early snapshot of a teacher as its autoguidance guide). They come from
the evaluation EMA, or, when `cfg.snapshot_ema_decay` is set, from a second EMA with that decay
(the guide's EMA length is tuned separately). Taken snapshots travel in the checkpoint.

Data parallelism: when `torch.distributed` is initialised (Ray Train workers, gloo on CPU or NCCL on
GPU), every worker draws its own share of the global batch and gradients are averaged with one
all-reduce per group. We average gradients by hand instead of wrapping in DDP because a method
owns several networks stepped by several optimisers, and DDP assumes one module and one forward.
"""
from __future__ import annotations

import copy
import math
import os
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .methods.base import Method


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _allreduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over workers in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def _make_opt(params, cfg, lr_scale: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr * lr_scale, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _state(nets: dict[str, torch.nn.Module]) -> dict[str, dict]:
    return {n: {k: v.detach().clone() for k, v in e.state_dict().items()} for n, e in nets.items()}


def train(method: Method, cfg, ckpt_dir: str | Path | None = None, seed: int = 0,
          callback: Callable[[int, dict], None] | None = None, progress: bool = True,
          snapshots: dict[int, dict[str, dict]] | None = None) -> dict[str, dict]:
    """Run `cfg.steps` iterations of `method`; return the evaluation-EMA state dicts of
    `method.export` networks. `cfg` is a recipe `TrainConfig`; `callback(step, logs)` receives the
    averaged logs every `cfg.log_every` steps (rank 0 only); `snapshots`, if given, receives
    {step: state dicts} for the steps in `cfg.snapshots`."""
    rank, world = rank_and_world()
    groups = method.groups()
    opts = {g.name: _make_opt(g.params, cfg, g.lr_scale) for g in groups}
    ema = {n: copy.deepcopy(method.nets[n]).requires_grad_(False) for n in method.export}
    snap_ema = ema if cfg.snapshot_ema_decay is None else {
        n: copy.deepcopy(method.nets[n]).requires_grad_(False) for n in method.export}
    taken: dict[int, dict[str, dict]] = {}
    tensors = method.tensors()
    n_data = next(iter(tensors.values())).shape[0]
    local_bs = max(1, cfg.batch_size // world)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    torch.manual_seed(seed * 1000 + 7919 * rank + 1)

    start = 0
    ckpt = Path(ckpt_dir) / "last.pt" if ckpt_dir else None
    if ckpt is not None and ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # a pickle that would run code or build objects: refused
            raise pickle.UnpicklingError(f"{ckpt}: not a tensors-only checkpoint, refusing to resume from it "
                                         f"({str(e).splitlines()[0]})") from None
        method.nets.load_state_dict(state["nets"])
        for n, sd in state["ema"].items():
            ema[n].load_state_dict(sd)
        for n, sd in state["opts"].items():
            opts[n].load_state_dict(sd)
        for n, sd in state.get("snap_ema", {}).items():
            snap_ema[n].load_state_dict(sd)
        taken = state.get("snapshots", {})
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])

    sums: dict[str, list[float]] = {}  # name -> [sum, count]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               mininterval=2.0, desc=type(method).__module__.rsplit(".", 1)[-1], dynamic_ncols=True)
    method.nets.train()
    for step in bar:
        idx = torch.randint(n_data, (local_bs,), generator=gen)
        batch = {k: v[idx].to(method.ctx.device) for k, v in tensors.items()}
        warm = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else 1.0
        for g in groups:
            if step % g.every:
                continue
            opt = opts[g.name]
            for pg in opt.param_groups:
                pg["lr"] = cfg.lr * g.lr_scale * warm
            opt.zero_grad(set_to_none=True)
            loss, logs = method.loss(g.name, batch, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss in group {g.name!r} at step {step}: {loss.item()}")
            loss.backward()
            _allreduce_grads(g.params, world)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(g.params, cfg.grad_clip)
            opt.step()
            for k, v in {f"{g.name}/loss": loss.item(), **{f"{g.name}/{k}": float(v) for k, v in logs.items()}}.items():
                acc = sums.setdefault(k, [0.0, 0])
                acc[0] += v
                acc[1] += 1
        for n in method.export:
            _ema_update(ema[n], method.nets[n], cfg.ema_decay)
            if snap_ema is not ema:
                _ema_update(snap_ema[n], method.nets[n], cfg.snapshot_ema_decay)
        if step + 1 in cfg.snapshots:
            taken[step + 1] = _state(snap_ema)
        method.after_step(step)

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logs = {k: s / max(c, 1) for k, (s, c) in sums.items()}
            sums = {}
            if rank == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")}, refresh=False)
                if callback:
                    callback(step + 1, logs)
        if ckpt is not None and rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic({"step": step + 1, "nets": method.nets.state_dict(),
                          "ema": {n: e.state_dict() for n, e in ema.items()},
                          "opts": {n: o.state_dict() for n, o in opts.items()},
                          "gen": gen.get_state(), "rng": torch.get_rng_state(), "snapshots": taken,
                          **({"snap_ema": {n: e.state_dict() for n, e in snap_ema.items()}}
                             if snap_ema is not ema else {})}, ckpt)
    bar.close()
    method.nets.eval()
    if snapshots is not None:
        snapshots.update(taken)
    return {n: e.state_dict() for n, e in ema.items()}


def ema_decay_for_halflife(halflife_steps: float) -> float:
    """Per-step decay whose weight halves after `halflife_steps` steps."""
    return math.exp(math.log(0.5) / halflife_steps)
