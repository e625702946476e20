"""Training throughput of the one loop against a bare PyTorch loop, and sampling throughput (issue 10).

For each workload the EDM teacher's method (`fastgen_core.methods.edm`: its network, its loss, its
batch) is trained for `--steps` steps twice over, alternately, `--repeats` times:

- `loop`: `fastgen_core.loop.train` (optimiser groups, warm-up lr, EMA, device-side loss records
  and finiteness checks at log steps, everything a recipe gets; no checkpoint, no progress bar);
- `bare`: the loop a researcher writes by hand — draw a batch, `method.loss`, zero_grad, backward,
  Adam step, EMA by `lerp_` per parameter, nothing read from the device.

Alternating makes the ratio meaningful on a machine that other jobs load (both see the same load);
the figures are medians. Samples/s are counted in wall time and in this process's CPU time (with
one thread, close to an idle machine's wall time); the load average is recorded. The image
workloads also report sampling samples/s (35-NFE Heun, `samplers.edm_sample`, batch 128).

Workloads: `toy-mlp` (8 Gaussians, MLP width 256 depth 4, batch 256), `digits-unet` (8x8x1
digits, class-conditional, U-Net width 32, levels [1, 2], batch 128), `rgb16-unet` (16x16x3, ten
classes, same U-Net; random pixels: the cost does not depend on them).

    python bench/throughput.py [--device cuda] [--precision bf16] [--steps 20] [--repeats 5]
Writes bench/results/throughput.json (or --out); prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastgen_core import loop  # noqa: E402
from fastgen_core.config import DataConfig, NetworkConfig, TrainConfig  # noqa: E402
from fastgen_core.data import Dataset, load_data  # noqa: E402
from fastgen_core.methods import edm  # noqa: E402
from fastgen_core.methods.base import Context  # noqa: E402
from fastgen_core.noise import EDM  # noqa: E402
from fastgen_core.samplers import edm_sample  # noqa: E402

UNET = dict(arch="unet", width=32, depth=1, channel_mult=[1, 2], emb_dim=128)
if "layout" in NetworkConfig.model_fields:  # the lean layout, where the network module has it
    UNET["layout"] = "lean"


def _images(shape, n=2048, classes=10, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g) * 2 - 1
    y = torch.randint(classes, (n,), generator=g)
    return Dataset(x, y, x[:256], y[:256], classes, None)


def workloads():
    yield "toy-mlp", (lambda: load_data(DataConfig(kind="toy", name="8gaussians", n_train=20000))), \
        NetworkConfig(arch="mlp", width=256, depth=4, emb_dim=128), 256
    yield "digits-unet", (lambda: load_data(DataConfig(kind="digits", conditional=True))), NetworkConfig(**UNET), 128
    yield "rgb16-unet", (lambda: _images((3, 16, 16))), NetworkConfig(**UNET), 128


def make_method(data: Dataset, net: NetworkConfig, device: str) -> edm.Method:
    torch.manual_seed(0)
    return edm.Method(edm.Config(), Context(data, EDM(), net, device=torch.device(device)))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_loop(method, cfg: TrainConfig, device: str) -> None:
    loop.train(method, cfg, None, progress=False)
    _sync(device)


def run_bare(method, cfg: TrainConfig, device: str) -> None:
    """The same steps by hand (same loss, batch, Adam, EMA; under the same autocast)."""
    net = method.nets["net"]
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas)
    ema = copy.deepcopy(net).requires_grad_(False)
    x, y = method.ctx.data.x.to(device), method.ctx.data.y
    y = y.to(device) if y is not None and method.ctx.data.num_classes else None
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    net.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen).to(device)
        batch = {"x": x[idx], **({"y": y[idx]} if y is not None else {})}
        opt.zero_grad(set_to_none=True)
        with amp:
            loss, _ = method.loss("net", batch, step)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
    _sync(device)


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def sampling(method, device: str, n: int = 128, steps: int = 18) -> dict:
    """Samples/s of a 35-NFE Heun sample (18 levels) of `n` images with the method's network."""
    method.nets.eval()
    D = method.D
    shape = method.ctx.data.shape
    y = torch.arange(n, device=device) % max(method.ctx.data.num_classes, 1)
    cond = {"class_labels": y} if method.ctx.data.num_classes else {}

    def go():
        with torch.no_grad():
            edm_sample(D, torch.randn(n, *shape, device=device), method.ctx.noise, steps, **cond)
        _sync(device)

    go()  # warm-up
    wall, cpu = timed(go)
    return {"sample_per_s_wall": n / wall, "sample_per_s_cpu": n / cpu, "sample_nfe": 2 * steps - 1}


def measure(name, make_data, net, batch, a) -> dict:
    data = make_data()
    cfg = TrainConfig(steps=a.steps, batch_size=batch, lr=1e-3, log_every=a.steps, ema_decay=0.999,
                      precision=a.precision)
    method = make_method(data, net, a.device)
    run_loop(method, cfg.model_copy(update={"steps": 2, "log_every": 2}), a.device)  # warm-up both paths
    run_bare(make_method(data, net, a.device), cfg.model_copy(update={"steps": 2}), a.device)
    t = {"loop": [], "bare": []}
    for r in range(a.repeats):
        for kind in (("loop", "bare") if r % 2 == 0 else ("bare", "loop")):
            m = make_method(data, net, a.device)
            t[kind].append(timed(lambda: (run_loop if kind == "loop" else run_bare)(m, cfg, a.device)))
    n = a.steps * batch
    row = {"workload": name, "shape": list(data.shape), "batch": batch, "steps": a.steps, "repeats": a.repeats,
           "params": sum(p.numel() for p in method.nets["net"].parameters())}
    for kind in ("loop", "bare"):
        row[f"{kind}_per_s_wall"] = n / statistics.median(w for w, _ in t[kind])
        row[f"{kind}_per_s_cpu"] = n / statistics.median(c for _, c in t[kind])
        row[f"{kind}_wall_s"] = [round(w, 4) for w, _ in t[kind]]
    # the ratio of medians, and the median of the ratios of each alternating pair
    row["ratio_wall"] = row["loop_per_s_wall"] / row["bare_per_s_wall"]
    row["ratio_cpu"] = row["loop_per_s_cpu"] / row["bare_per_s_cpu"]
    row["ratio_pairs_wall"] = statistics.median(b[0] / l[0] for l, b in zip(t["loop"], t["bare"]))
    if data.is_image:
        row.update(sampling(method, a.device))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=20, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="alternating loop/bare runs (medians)")
    ap.add_argument("--only", nargs="*", help="workloads to run (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = []
    print(f"{'workload':12s} {'shape':10s} {'batch':>5s} {'loop/s':>9s} {'bare/s':>9s} {'ratio':>6s} "
          f"{'(cpu)':>6s} {'sample/s':>9s}   (training samples/s, wall; ratio = loop/bare)")
    for name, make_data, net, batch in workloads():
        if a.only and name not in a.only:
            continue
        r = measure(name, make_data, net, batch, a)
        rows.append(r)
        print(f"{name:12s} {'x'.join(map(str, r['shape'])):10s} {batch:5d} {r['loop_per_s_wall']:9.0f} "
              f"{r['bare_per_s_wall']:9.0f} {r['ratio_wall']:6.3f} {r['ratio_cpu']:6.3f} "
              f"{r.get('sample_per_s_wall', float('nan')):9.1f}", flush=True)
    machine = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": a.device,
               "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
               "precision": a.precision, "torch": torch.__version__, "uptime_before": uptime,
               "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\nmachine: {machine}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
