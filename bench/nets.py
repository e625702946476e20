"""Training-step and sampling cost of the image networks on CPU (issue 10): where a U-Net's time goes.

For each row: parameters, the median ms of one full training step at batch 128 (forward, an L2
loss, backward, Adam step) and the median ms of one network evaluation at batch 128 without
gradients (one NFE of a sampler; a 35-NFE Heun sample of 128 images costs 35x that), both in this
process's CPU time (with one thread, close to an idle machine's wall time) and in wall time. Rows:

- `mlp`: the MLP the digits recipes used (width 256, depth 4), for reference;
- `unet ddpm` / `unet lean` (NetworkConfig.layout) at 8x8x1, 16x16x3, 32x32x3 with the issue's
  width 32, depth 1 (levels [1, 2] at 8 and 16, [1, 2, 2] at 32);
- ablations at 16x16x3 (`--ablate`): each lean change alone on the ddpm layout, `channels_last`,
  two threads, GroupNorm replaced by the identity (its cost), attention at 16 and 8;
- candidate digits teachers (`--digits`).

Class-conditional (10 classes) throughout; one torch thread unless the row says otherwise.
Timings on a shared machine vary with its load (the load average is recorded): compare rows of one
run. Writes bench/results/nets.json; prints a table.

    python bench/nets.py [--ablate] [--digits] [--iters 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastgen_core.config import NetworkConfig  # noqa: E402
from fastgen_core.nets import LAYOUTS, UNet, build_network, count_params  # noqa: E402

N_BATCH, N_CLASSES = 128, 10
MLP = dict(arch="mlp", width=256, depth=4, emb_dim=128)
UNET = dict(arch="unet", width=32, depth=1, emb_dim=128)
SHAPES = {(1, 8, 8): [1, 2], (3, 16, 16): [1, 2], (3, 32, 32): [1, 2, 2]}


def median_ms(fn, iters: int) -> tuple[float, float]:
    """Median wall-clock and CPU (this process) milliseconds of `fn()`. With one thread on a shared
    machine the CPU time is close to an idle machine's wall-clock time; the wall time is inflated
    by the other jobs' load."""
    fn()  # warm-up (allocations, oneDNN primitive creation)
    wall, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000 * sorted(wall)[len(wall) // 2], 1000 * sorted(cpu)[len(cpu) // 2]


def measure(net: nn.Module, shape, iters: int, channels_last: bool = False, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_BATCH, *shape, generator=g), torch.randn(N_BATCH, *shape, generator=g)
    t, labels = torch.randn(N_BATCH, generator=g), torch.randint(0, N_CLASSES, (N_BATCH,), generator=g)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-4)

    def step():
        loss = (net(x, t, class_labels=labels) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample():
        with torch.no_grad():
            net(x, t, class_labels=labels)

    (step_wall, step_cpu), (nfe_wall, nfe_cpu) = median_ms(step, iters), median_ms(sample, iters)
    row = {"params": count_params(net), "step_cpu_ms": step_cpu, "nfe_cpu_ms": nfe_cpu,
           "step_wall_ms": step_wall, "nfe_wall_ms": nfe_wall}
    torch.set_num_threads(1)
    return row


def no_groupnorm(net: nn.Module) -> nn.Module:
    """The same network with every GroupNorm replaced by the identity (to time GroupNorm)."""
    for name, m in list(net.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(m, child_name, nn.Identity())
    return net


def rows(ablate: bool, digits: bool):
    """(label, shape, network factory, measure options)."""
    for shape, mult in SHAPES.items():
        side = "x".join(map(str, shape))
        if shape == (1, 8, 8):
            yield "mlp w256 d4", side, shape, lambda s=shape: build_network(NetworkConfig(**MLP), s, N_CLASSES), {}
        for layout in ("ddpm", "lean"):
            cfg = NetworkConfig(**UNET, channel_mult=mult, layout=layout)
            yield f"unet {layout} w32 d1 {mult}", side, shape, lambda c=cfg, s=shape: build_network(c, s, N_CLASSES), {}
    if ablate:
        shape, side, cfg = (3, 16, 16), "3x16x16", NetworkConfig(**UNET, channel_mult=[1, 2])
        ddpm, lean = LAYOUTS["ddpm"], LAYOUTS["lean"]
        for label, change in [("ddpm + skips=blocks, up_extra=0", dict(skips="blocks", up_extra=0)),
                              ("ddpm + mid_blocks=1", dict(mid_blocks=1)),
                              ("ddpm + pool down", dict(down_conv=False)),
                              ("ddpm + conv-first up", dict(up_conv_first=True))]:
            yield label, side, shape, lambda ch=change: UNet(cfg, shape, N_CLASSES, layout={**ddpm, **ch}), {}
        yield "ddpm channels_last", side, shape, lambda: UNet(cfg, shape, N_CLASSES), {"channels_last": True}
        yield "ddpm 2 threads", side, shape, lambda: UNet(cfg, shape, N_CLASSES), {"threads": 2}
        yield "ddpm no GroupNorm", side, shape, lambda: no_groupnorm(UNet(cfg, shape, N_CLASSES)), {}
        yield "lean no GroupNorm", side, shape, lambda: no_groupnorm(UNet(cfg, shape, N_CLASSES, layout=lean)), {}
        attn = NetworkConfig(**UNET, channel_mult=[1, 2], attn_resolutions=[16, 8])
        yield "ddpm attn [16, 8]", side, shape, lambda: UNet(attn, shape, N_CLASSES), {}
        yield "lean attn [16, 8]", side, shape, lambda: UNet(attn, shape, N_CLASSES, layout=lean), {}
    if digits:
        shape, side = (1, 8, 8), "1x8x8"
        for w, d, mult in [(32, 1, [1, 2]), (32, 2, [1, 2]), (48, 1, [1, 2]), (64, 1, [1, 2]), (32, 1, [1, 2, 2]),
                           (64, 1, [1, 1]), (32, 2, [2, 2])]:
            cfg = NetworkConfig(arch="unet", width=w, depth=d, channel_mult=mult, emb_dim=128, layout="lean")
            yield f"unet lean w{w} d{d} {mult}", side, shape, lambda c=cfg: build_network(c, shape, N_CLASSES), {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ablate", action="store_true", help="ablations at 16x16x3")
    ap.add_argument("--digits", action="store_true", help="candidate digits teachers at 8x8x1")
    ap.add_argument("--iters", type=int, default=5, help="timed repetitions per row (median)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "nets.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    print(f"{'network':36s} {'shape':8s} {'params':>9s} {'ms/step':>9s} {'ms/NFE':>8s}  (CPU time; wall time)")
    for label, side, shape, make, opts in rows(a.ablate, a.digits):
        torch.manual_seed(0)
        r = {"network": label, "shape": side, **opts, **measure(make(), shape, a.iters, **opts)}
        results.append(r)
        print(f"{label:36s} {side:8s} {r['params']:9d} {r['step_cpu_ms']:9.1f} {r['nfe_cpu_ms']:8.1f}  "
              f"(wall {r['step_wall_ms']:.1f}, {r['nfe_wall_ms']:.1f})", flush=True)
    machine = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "threads": 1, "batch": N_BATCH, "torch": torch.__version__,
               "load_average": os.getloadavg()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": results}, indent=2))
    print(f"\nmachine: {machine}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
