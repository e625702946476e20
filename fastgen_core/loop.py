"""The one training loop. Every method (teacher DSM, CD, CT, sCM, CTM, DMD2, ...) runs through
`train`: it knows nothing about any method beyond the `methods.base.Method` interface.

Per iteration: draw a minibatch from `method.tensors()`; for each optimiser group due this step
(`Group.due`: `step % every == 0`, less the steps its `skip_every` skips) zero its gradients,
compute `method.loss(group)`, backpropagate (`batch_gpu` rows at a time when set, the gradients
accumulated), average gradients over workers, clip and step (at
lr · `lr_multiplier`: linear warmup, then constant or, `lr_schedule: linear_decay`, down to 0); then
update the evaluation EMA and call `method.after_step`. Checkpoints (`last.pt`, tensors only, loaded with `weights_only=True`) are
written atomically every `ckpt_every` steps and training resumes from them exactly: they hold every
random state the loop draws from (the batch generator, torch's CPU generator, and CUDA's generators
of all devices — an empty list when CUDA is not in use), for every worker. A non-finite loss stops
training with `NonFiniteLoss` (the first non-finite step and its group, and the last checkpoint,
which holds only finite steps).

The GPU path: the loop never waits for the device within a step. Losses and logged values stay on
the device and are read (one transfer) at log steps; finiteness is checked at log steps, before
every checkpoint is written and at the end, from the losses recorded since the last check: the
first non-finite one names the step and group of `NonFiniteLoss`, and as no checkpoint is written
after it the one it points to holds only finite steps (the steps run between it and the check are
discarded with the process). `cfg.precision: bf16` computes each loss under bfloat16 autocast
(backward, parameters, optimiser state and EMA stay fp32); `cfg.compile` compiles the trained
networks in place (`nn.Module.compile`: the state dicts keep their keys). On CPU, with fp32, the
results are bit-identical to a loop that checks and reads every step.

Snapshots: at the steps in `cfg.snapshots` the loop keeps a copy of the EMA weights of the
exported networks (e.g. an early snapshot of a teacher as its autoguidance guide). They come from
the evaluation EMA, or, when `cfg.snapshot_ema_decay` is set, from a second EMA with that decay
(the guide's EMA length is tuned separately). Taken snapshots travel in the checkpoint.

Data parallelism: when `torch.distributed` is initialised (Ray Train workers, gloo on CPU or NCCL on
GPU), every worker draws its own share of the global batch and gradients are averaged with one
all-reduce per group. We average gradients by hand instead of wrapping in DDP because a method
owns several networks stepped by several optimisers, and DDP assumes one module and one forward.
Every worker takes part in every all-reduce whatever its backward reached: a parameter that got no
gradient on one worker contributes zeros (as DDP's unused parameters do), and a non-finite loss on
any worker stops all of them at the same check point (its step all-reduced there) instead of
leaving the others waiting.
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


class NonFiniteLoss(FloatingPointError):
    """A loss that is not finite. `step` is the loop's step index (the `step` passed to
    `Method.loss`); `checkpoint` the last checkpoint written, which holds `checkpoint_step`
    completed steps, all with finite losses (None when none was written yet)."""

    def __init__(self, step: int, group: str, value: float, checkpoint: Path | None,
                 checkpoint_step: int | None, rank: int = 0):
        self.step, self.group, self.value, self.rank = step, group, value, rank
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        where = " on another worker" if value is None else f" ({value})"
        kept = (f"last finite checkpoint (step {checkpoint_step}) kept in {checkpoint}"
                if checkpoint is not None else "no checkpoint written yet")
        super().__init__(f"non-finite loss{where} at step {step} in optimiser group {group!r}; {kept}")

    def __reduce__(self):  # travels from a Ray Train worker to the driver
        return type(self), (self.step, self.group, self.value, self.checkpoint, self.checkpoint_step, self.rank)


def _allreduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over workers in one flat all-reduce. Every worker contributes every
    parameter, zeros where it got no gradient, so the collective never depends on which parameters a
    worker's loss reached; a parameter with a gradient on no worker keeps none (the optimiser skips
    it, as it would alone). Nothing is read back to the host unless this worker lacks a gradient
    (only then must it learn whether another worker has one)."""
    if world == 1:
        return
    missing = [p.grad is None for p in params]
    like = dict(dtype=params[0].dtype, device=params[0].device) if params else {}
    mask = (torch.tensor([float(not m) for m in missing], **like) if any(missing)
            else torch.ones(len(params), **like))  # (made on the device: no copy from the host)
    flat = torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if m else p.grad.reshape(-1)
                      for p, m in zip(params, missing)] + [mask])
    dist.all_reduce(flat)
    has = flat[len(flat) - len(params):].tolist() if any(missing) else [1.0] * len(params)
    i = 0
    for p, n in zip(params, has):
        if n > 0:
            avg = (flat[i:i + p.numel()] / world).view_as(p)
            if p.grad is None:
                p.grad = avg.to(p.dtype, copy=True)
            else:
                p.grad.copy_(avg)
        i += p.numel()


class _Watch:
    """The losses and logged values of the steps since the last check, kept where they were
    computed (on the device) until a check point reads them."""

    def __init__(self, groups: list, device: torch.device):
        self.names, self.device = [g.name for g in groups], device
        self.losses: list[tuple[int, int, torch.Tensor]] = []  # (step, group index, loss) since the last check
        self.logs: dict[str, list] = {}  # name -> values since the last log step

    def add(self, step: int, gi: int, loss: torch.Tensor, logs: dict) -> None:
        loss = loss.detach()
        self.losses.append((step, gi, loss))
        for k, v in [("loss", loss), *logs.items()]:
            self.logs.setdefault(f"{self.names[gi]}/{k}", []).append(
                v.detach() if isinstance(v, torch.Tensor) else float(v))

    def check(self, world: int, rank: int, ckpt: Path | None, saved: int | None) -> None:
        """Raise `NonFiniteLoss` for the first non-finite loss since the last check on any worker (a
        collective: every worker calls it at the same steps; one read from the device)."""
        n = len(self.losses)
        first = torch.tensor(n, device=self.device)
        if n:
            ok = torch.isfinite(torch.stack([loss.reshape(()).float() for _, _, loss in self.losses]))
            first = torch.where(ok.to(self.device), n, torch.arange(n, device=self.device)).min()
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        i = int(first)
        if i < n:
            step, gi, loss = self.losses[i]
            value = loss.item()
            raise NonFiniteLoss(step, self.names[gi], None if math.isfinite(value) else value,
                                ckpt if saved else None, saved, rank)
        self.losses = []

    def read_logs(self) -> dict[str, float]:
        """The mean of every logged value since the last log step (one read from the device)."""
        tensors = [v for vs in self.logs.values() for v in vs if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([t.reshape(()).to(tensors[0].device, torch.float64) for t in tensors]).tolist()
                    if tensors else ())
        out = {}
        for k, vs in self.logs.items():
            vals = [next(read) if isinstance(v, torch.Tensor) else v for v in vs]
            out[k] = sum(vals) / max(len(vals), 1)
        self.logs = {}
        return out


def _make_opt(params, cfg, lr_scale: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr * lr_scale, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


class _EMA:
    """ema ← lerp(ema, net, 1 − decay) over the parameters (one fused `_foreach_lerp_`, on CPU the
    same per-tensor `lerp_`); buffers copied."""

    def __init__(self, ema: torch.nn.Module, net: torch.nn.Module, decay: float):
        self.pe, self.p = list(ema.parameters()), list(net.parameters())
        self.be, self.b = list(ema.buffers()), list(net.buffers())
        self.weight = 1 - decay

    @torch.no_grad()
    def __call__(self) -> None:
        if self.pe:
            torch._foreach_lerp_(self.pe, self.p, self.weight)
        if self.be:
            torch._foreach_copy_(self.be, self.b)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _state(nets: dict[str, torch.nn.Module]) -> dict[str, dict]:
    return {n: {k: v.detach().clone() for k, v in e.state_dict().items()} for n, e in nets.items()}


def rng_state(gen: torch.Generator) -> dict:
    """This worker's random states: its batch generator, torch's CPU generator and `cuda`, the
    generators of all CUDA devices visible to it when CUDA is in use in this process, else empty (a
    process that never touched CUDA drew nothing from them, and reading them would start CUDA on
    every device)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"gen": gen.get_state(), "rng": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["gen"])
    torch.set_rng_state(state["rng"])
    cuda = state.get("cuda", state.get("cuda_rng", []))  # cuda_rng: checkpoints written before `cuda`
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def _all_rng_states(gen: torch.Generator, world: int) -> list[dict]:
    """Every worker's `rng_state`, in rank order (a collective: every worker calls it)."""
    mine = rng_state(gen)
    if world == 1:
        return [mine]
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return every


def _load_checkpoint(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a pickle that would run code or build objects: refused
        raise pickle.UnpicklingError(f"{ckpt}: not a tensors-only checkpoint, refusing to resume from it "
                                     f"({str(e).splitlines()[0]})") from None


def checkpoint_step(ckpt_dir: str | Path | None) -> int | None:
    """The number of completed steps in `ckpt_dir`'s checkpoint (None: there is none)."""
    ckpt = Path(ckpt_dir) / "last.pt" if ckpt_dir else None
    if ckpt is None or not ckpt.exists():
        return None
    try:  # memory-mapped: the tensors are not read
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError):  # not a plain zip checkpoint: refused with its reason
        state = _load_checkpoint(ckpt)
    return int(state["step"])


class _State:
    """What the loop carries from step to step and saves in its checkpoint."""

    def __init__(self, method: Method, cfg, groups: list, gen: torch.Generator):
        self.method, self.gen = method, gen
        self.opts = {g.name: _make_opt(g.params, cfg, g.lr_scale) for g in groups}
        self.ema = {n: copy.deepcopy(method.nets[n]).requires_grad_(False) for n in method.export}
        self.snap_ema = self.ema if cfg.snapshot_ema_decay is None else {
            n: copy.deepcopy(method.nets[n]).requires_grad_(False) for n in method.export}
        self.taken: dict[int, dict[str, dict]] = {}
        self.ema_updates = [_EMA(self.ema[n], method.nets[n], cfg.ema_decay) for n in method.export] + (
            [] if self.snap_ema is self.ema else
            [_EMA(self.snap_ema[n], method.nets[n], cfg.snapshot_ema_decay) for n in method.export])

    def save(self, ckpt: Path, step: int, world: int, rank: int) -> None:
        """Write the checkpoint after `step` completed steps (a collective: every worker calls it;
        rank 0 writes, and every worker returns once it is written)."""
        rngs = _all_rng_states(self.gen, world)
        if rank == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic({"step": step, "nets": self.method.nets.state_dict(),
                          "ema": {n: e.state_dict() for n, e in self.ema.items()},
                          "opts": {n: o.state_dict() for n, o in self.opts.items()},
                          "rng_states": rngs, "snapshots": self.taken,
                          **({"snap_ema": {n: e.state_dict() for n, e in self.snap_ema.items()}}
                             if self.snap_ema is not self.ema else {})}, ckpt)
        if world > 1:
            dist.barrier()

    def load(self, ckpt: Path, rank: int) -> int:
        """Restore from the checkpoint; return its number of completed steps. Each worker takes
        back its own random states (a checkpoint from fewer workers leaves the others' seeded)."""
        state = _load_checkpoint(ckpt)
        self.method.nets.load_state_dict(state["nets"])
        for n, sd in state["ema"].items():
            self.ema[n].load_state_dict(sd)
        for n, sd in state["opts"].items():
            self.opts[n].load_state_dict(sd)
        for n, sd in state.get("snap_ema", {}).items():
            self.snap_ema[n].load_state_dict(sd)
        self.taken = state.get("snapshots", {})
        rngs = state.get("rng_states") or [{"gen": state["gen"], "rng": state["rng"]}]
        if rank < len(rngs):
            set_rng_state(self.gen, rngs[rank])
        return int(state["step"])


# Datasets up to this size are moved to the accelerator once (batches are then gathered there);
# larger ones stay in host memory and each batch is copied over.
DATA_ON_DEVICE_BYTES = 2 << 30


def _batches(tensors: dict[str, torch.Tensor], device: torch.device):
    """`draw(idx)`: the minibatch of rows `idx` (drawn on the CPU generator) on `device`."""
    if device.type != "cpu" and sum(v.numel() * v.element_size() for v in tensors.values()) <= DATA_ON_DEVICE_BYTES:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return lambda idx: {k: v[idx.to(v.device, non_blocking=True)].to(device, non_blocking=True)
                        for k, v in tensors.items()}


def compile_trained(method: Method, groups: list) -> None:
    """Compile in place (`nn.Module.compile`: state dict keys unchanged) each of the method's
    networks that an optimiser group trains."""
    trained = {id(p) for g in groups for p in g.params}
    for net in method.nets.values():
        if any(id(p) in trained for p in net.parameters()):
            net.compile()


def train(method: Method, cfg, ckpt_dir: str | Path | None = None, seed: int = 0,
          callback: Callable[[int, dict], None] | None = None, progress: bool = True,
          snapshots: dict[int, dict[str, dict]] | None = None) -> dict[str, dict]:
    """Run `cfg.steps` iterations of `method`; return the evaluation-EMA state dicts of
    `method.export` networks. `cfg` is a recipe `TrainConfig`; `callback(step, logs)` receives the
    averaged logs every `cfg.log_every` steps (rank 0 only); `snapshots`, if given, receives
    {step: state dicts} for the steps in `cfg.snapshots`. Raises `NonFiniteLoss` (on every worker)
    when a loss is not finite."""
    rank, world = rank_and_world()
    groups = method.groups()
    device = torch.device(method.ctx.device)
    st = _State(method, cfg, groups, torch.Generator().manual_seed(seed * 1000 + rank))
    torch.manual_seed(seed * 1000 + 7919 * rank + 1)
    tensors = method.tensors()
    n_data = next(iter(tensors.values())).shape[0]
    draw = _batches(tensors, device)
    local_bs = max(1, cfg.batch_size // world)
    if cfg.compile:
        compile_trained(method, groups)  # after the EMA copies: they stay plain modules
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    ckpt = Path(ckpt_dir) / "last.pt" if ckpt_dir else None
    start = st.load(ckpt, rank) if ckpt is not None and ckpt.exists() else 0
    saved = start if start else None  # the last checkpoint's step

    watch = _Watch(groups, device)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               mininterval=2.0, desc=type(method).__module__.rsplit(".", 1)[-1], dynamic_ncols=True)
    method.nets.train()
    for step in bar:
        try:
            _step(step, method, cfg, st, groups, watch, draw, n_data, local_bs, autocast, world)
        except Exception as e:
            if world == 1 and not isinstance(e, NonFiniteLoss):  # e.g. NaN weights after an unchecked
                watch.check(world, rank, ckpt, saved)              # non-finite loss: report the loss
            raise
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        save_now = ckpt is not None and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps)
        if log_now or save_now:
            watch.check(world, rank, ckpt, saved)
        if log_now:
            logs = watch.read_logs()
            if rank == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")}, refresh=False)
                if callback:
                    callback(step + 1, logs)
        if save_now:
            st.save(ckpt, step + 1, world, rank)
            saved = step + 1
    bar.close()
    method.nets.eval()
    if snapshots is not None:
        snapshots.update(st.taken)
    return {n: e.state_dict() for n, e in st.ema.items()}


def lr_multiplier(step: int, cfg) -> float:
    """The learning rate of step `step` (0 … steps − 1) over `cfg.lr`: the linear warmup
    min(1, (step + 1)/lr_warmup), times 1 − step/steps for `lr_schedule: linear_decay` (annealed
    linearly to 0 over the run, as progressive distillation within each round)."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else 1.0
    return warm * (1 - step / cfg.steps if cfg.lr_schedule == "linear_decay" else 1.0)


def _step(step: int, method: Method, cfg, st: _State, groups: list, watch: _Watch, draw, n_data: int,
          local_bs: int, autocast, world: int) -> None:
    """One iteration: a minibatch, each due group's loss, gradient and optimiser step (no read from
    the device), the EMA updates, snapshots and `method.after_step`."""
    batch = draw(torch.randint(n_data, (local_bs,), generator=st.gen))
    mult = lr_multiplier(step, cfg)
    for gi, g in enumerate(groups):
        if not g.due(step):
            continue
        opt = st.opts[g.name]
        for pg in opt.param_groups:
            pg["lr"] = cfg.lr * g.lr_scale * mult
        opt.zero_grad(set_to_none=True)
        loss, logs = _accumulate(method, g.name, batch, step, cfg.batch_gpu, autocast)
        _allreduce_grads(g.params, world)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(g.params, cfg.grad_clip)
        opt.step()
        watch.add(step, gi, loss, logs)
    for update in st.ema_updates:
        update()
    if step + 1 in cfg.snapshots:
        st.taken[step + 1] = _state(st.snap_ema)
    method.after_step(step)


def _accumulate(method: Method, group: str, batch: dict, step: int, chunk: int | None, autocast):
    """Backpropagate `group`'s loss over `batch`, `chunk` rows at a time (`TrainConfig.batch_gpu`):
    each chunk's loss weighted by its share of the rows, so the accumulated gradient is that of the
    batch's mean loss; returns the loss and logs, weighted the same way (still on the device). A
    non-finite loss is backpropagated too: the steps after it are discarded at the next check."""
    n = next(iter(batch.values())).shape[0]
    if chunk is None or chunk >= n:
        with autocast:
            loss, logs = method.loss(group, batch, step)
        loss.backward()
        return loss, logs
    total, logs = 0.0, {}
    for i in range(0, n, chunk):
        part = {k: v[i:i + chunk] for k, v in batch.items()}
        w = next(iter(part.values())).shape[0] / n
        with autocast:
            loss, part_logs = method.loss(group, part, step)
        (loss * w).backward()
        total = total + loss.detach() * w
        for k, v in part_logs.items():
            logs[k] = logs.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v) * w
    return total, logs


def ema_decay_for_halflife(halflife_steps: float) -> float:
    """Per-step decay whose weight halves after `halflife_steps` steps."""
    return math.exp(math.log(0.5) / halflife_steps)
