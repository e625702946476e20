"""The loop's GPU path, exercised on CPU: bf16 autocast (`train.precision`) resumes bit-exactly and
really changes the computation while parameters, optimiser state and EMA stay fp32; derivatives by
JVP stay fp32 under autocast (sCT on a conv net trains under bf16); the loop reads nothing from the
device within a step (only at its check points), and a non-finite loss found late is still named
by its own step; the checkpoint's random states always carry
`cuda` (empty without CUDA); and the Ray Train settings of a GPU job (NCCL, one GPU per worker)."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from fastgen_core import loop
from fastgen_core.config import DataConfig, NetworkConfig, TrainConfig
from fastgen_core.data import load_data
from fastgen_core.methods import edm, scm
from fastgen_core.methods.base import Context
from fastgen_core.nets import build_network
from fastgen_core.noise import EDM
from fastgen_core.tangents import jvp

BF16 = dict(precision="bf16")


def _toy(seed=0):
    data = load_data(DataConfig(kind="toy", name="8gaussians", n_train=500, n_test=100))
    torch.manual_seed(seed)
    return edm.Method(edm.Config(), Context(data, EDM(), NetworkConfig(arch="mlp", width=32, depth=1, emb_dim=16),
                                            device=torch.device("cpu")))


def test_bf16_resume_is_exact_and_state_stays_fp32(tmp_path):
    """As tests/test_core.py::test_loop_resume_is_exact, under bf16 autocast: a run cut at step 10
    and resumed equals the uninterrupted one bit for bit; the checkpoint's weights, EMA and Adam
    moments are fp32; each worker's random states are gen, rng and cuda (empty: no CUDA here)."""
    cfg = TrainConfig(steps=20, batch_size=32, ckpt_every=10, log_every=5, **BF16)
    full = loop.train(_toy(), cfg, tmp_path / "a", progress=False)
    loop.train(_toy(), cfg.model_copy(update={"steps": 10}), tmp_path / "b", progress=False)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert set(state) == {"step", "nets", "ema", "opts", "rng_states", "snapshots"}
    (rngs,) = state["rng_states"]
    assert set(rngs) == {"gen", "rng", "cuda"} and rngs["cuda"] == []
    floats = [*state["nets"].values(), *state["ema"]["net"].values(),
              *(t for s in state["opts"]["net"]["state"].values() for k, t in s.items() if k != "step")]
    assert floats and {t.dtype for t in floats if t.is_floating_point()} == {torch.float32}
    resumed = loop.train(_toy(), cfg, tmp_path / "b", progress=False)
    assert all(torch.equal(full["net"][k], resumed["net"][k]) for k in full["net"])


def test_bf16_changes_the_losses_but_stays_close():
    """Same seeds, same batches: the logged per-step losses under bf16 differ from fp32 (autocast is
    applied) yet stay within a few percent (bf16 keeps 8 significant bits)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        got = []
        loop.train(_toy(), TrainConfig(steps=8, batch_size=64, log_every=1, precision=precision), None,
                   progress=False, callback=lambda s, logs: got.append(logs["net/loss"]))
        losses[precision] = torch.tensor(got)
    a, b = losses["fp32"], losses["bf16"]
    assert not torch.equal(a, b)
    assert ((a - b).abs() / a).max() < 0.05, (a, b)


def test_jvp_under_autocast_is_the_fp32_jvp_on_a_conv_net():
    """torch.func.jvp under bf16 autocast fails on a conv net (its tangent meets bf16 weights) and a
    finite difference would drown in bf16 rounding: `tangents.jvp` takes derivatives in fp32 under
    autocast — the same bits as without it — while a plain forward under autocast differs."""
    torch.manual_seed(0)
    net = build_network(NetworkConfig(arch="unet", width=8, depth=1, channel_mult=[1], emb_dim=8), (1, 4, 4))
    for p in net.parameters():  # the output layer starts at zero: give every layer weights
        torch.nn.init.normal_(p, std=0.3)
    x, t, v = torch.randn(3, 1, 4, 4), torch.rand(3), torch.randn(3, 1, 4, 4)
    fn = lambda x, t: net(x, t)  # noqa: E731
    xb = x.bfloat16()  # an input computed under autocast may come in bf16: taken as its fp32 value
    for mode in ("func", "fd"):
        ref = jvp(fn, (x, t), (v, torch.ones(3)), mode=mode)
        ref_b = jvp(fn, (xb.float(), t), (v, torch.ones(3)), mode=mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = jvp(fn, (x, t), (v, torch.ones(3)), mode=mode)
            got_b = jvp(fn, (xb, t), (v, torch.ones(3)), mode=mode)
            plain = net(x, t)
        assert all(torch.equal(r, g) for r, g in [*zip(ref, got), *zip(ref_b, got_b)]), mode
    assert not torch.equal(plain.float(), ref[0])


def test_sct_on_a_conv_net_trains_under_bf16():
    """sCT (one JVP per step) on 8×8 digits with a small U-Net under bf16: the same seeds and batches
    as an fp32 run give per-step losses that differ (autocast is applied) yet stay within a few
    percent, and the weights move."""
    data = load_data(DataConfig(kind="digits"))
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = scm.Method(scm.Config(variant="sct", c_noise="t", init_from_teacher=False, weight_width=8),
                       Context(data, EDM(sigma_data=0.5), NetworkConfig(arch="unet", width=8, depth=1,
                                                                        channel_mult=[1, 2], emb_dim=8),
                               device=torch.device("cpu")))
        before = [p.detach().clone() for p in m.nets["net"].parameters()]
        got = []
        loop.train(m, TrainConfig(steps=3, batch_size=8, log_every=1, precision=precision), None, progress=False,
                   callback=lambda s, logs: got.append(logs["net/loss"]))
        assert any(not torch.equal(a, b) for a, b in zip(before, m.nets["net"].parameters()))
        losses[precision] = torch.tensor(got)
    a, b = losses["fp32"], losses["bf16"]
    assert len(b) == 3 and not torch.equal(a, b)
    assert ((a - b).abs() / a.abs()).max() < 0.05, (a, b)


def test_the_loop_reads_the_device_only_at_its_check_points(monkeypatch):
    """No host synchronisation per step: over 20 steps with log and checkpoint checks every 10, the
    loop's own code reads tensors to the host (item, bool, float, int, tolist) only at the 2 check
    points, a bounded number of reads each — the previous loop read twice every step."""
    reads = []
    here = loop.__file__
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == here:
                reads.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    loop.train(_toy(), TrainConfig(steps=20, batch_size=32, log_every=10), None, progress=False)
    assert 2 <= len(reads) <= 2 * 3, reads  # per check: the first non-finite index, the logs


class NaNThenFails(edm.Method):
    """A NaN loss at step 3 (between check points), then an error from the NaN weights at step 5
    (as a method with a data-dependent host decision would raise)."""

    def loss(self, group, batch, step):
        if step == 5 and not all(bool(torch.isfinite(p).all()) for p in self.nets["net"].parameters()):
            raise ValueError("NaN weights")
        loss, logs = super().loss(group, batch, step)
        return (loss * float("nan") if step == 3 else loss), logs


def test_a_nonfinite_loss_between_checks_is_reported_even_if_a_later_step_fails(tmp_path):
    """Checks every 10 steps: the NaN at step 3 is found when step 5 fails on the NaN weights, and
    reported as the first non-finite loss (step 3) rather than as the later error; no checkpoint."""
    m = _toy()
    with pytest.raises(loop.NonFiniteLoss) as e:
        loop.train(NaNThenFails(m.cfg, m.ctx), TrainConfig(steps=20, batch_size=32, log_every=10, ckpt_every=10),
                   tmp_path, progress=False)
    assert (e.value.step, e.value.group, e.value.checkpoint) == (3, "net", None)
    assert not (tmp_path / "last.pt").exists()


def test_ray_train_settings_of_a_gpu_job():
    """A GPU job asks Ray Train for one GPU per worker besides its CPUs and for the NCCL backend;
    a CPU job for gloo and no GPU."""
    from stages.train import ray_settings  # ray[train] is a dependency: no skip

    class Compute:
        num_workers, cpus_per_worker = 2, 3

    gpu = ray_settings(type("C", (Compute,), {"use_gpu": True}))
    cpu = ray_settings(type("C", (Compute,), {"use_gpu": False}))
    assert gpu["torch_config"].backend == "nccl" and cpu["torch_config"].backend == "gloo"
    assert gpu["scaling_config"].use_gpu and not cpu["scaling_config"].use_gpu
    assert gpu["scaling_config"].num_workers == 2
    assert gpu["scaling_config"].resources_per_worker == {"CPU": 3, "GPU": 1}
    assert cpu["scaling_config"].resources_per_worker == {"CPU": 3}


class FixedNoise(edm.Method):
    """EDM's denoising loss at one noise level with noise fixed per sample (a deterministic
    function of the batch), so the whole batch and its chunks have one true gradient to compare."""

    def loss(self, group, batch, step):
        x = batch["x"]
        noise = torch.sin(1000 * x[:, :1] + x[:, 1:] + torch.arange(2.0)) * 0.8  # per sample, no draw
        per = ((self.D(x + noise, torch.full((len(x),), 0.3)) - x) ** 2).sum(1)
        return per.mean(), {"first_coord": x[:, 0].mean()}


@pytest.mark.parametrize("chunk", [5, 8])
def test_batch_gpu_accumulates_the_gradient_of_the_whole_batch(chunk):
    """`train.batch_gpu`: a worker's batch of 16 passed 5 (5, 5, 5, 1) or 8 rows at a time gives the
    parameters and logged values of the whole batch at once (EDM's batch_gpu): each chunk's loss is
    weighted by its share of the rows, so the accumulated gradient is the mean loss's."""
    data = load_data(DataConfig(kind="toy", name="8gaussians", n_train=500, n_test=100))
    out, logs = {}, {}
    for bg in (None, chunk):
        torch.manual_seed(0)
        m = FixedNoise(edm.Config(), Context(data, EDM(), NetworkConfig(arch="mlp", width=32, depth=1, emb_dim=16),
                                             device=torch.device("cpu")))
        seen = []
        loop.train(m, TrainConfig(steps=6, batch_size=16, lr=1e-2, ema_decay=0.5, log_every=3, batch_gpu=bg),
                   None, callback=lambda s, lg: seen.append(lg), progress=False)
        out[bg], logs[bg] = torch.cat([p.detach().reshape(-1) for p in m.nets.parameters()]), seen
    assert torch.allclose(out[chunk], out[None], rtol=1e-4, atol=1e-6), (out[chunk] - out[None]).abs().max()
    assert len(logs[None]) == len(logs[chunk]) == 2
    for a, b in zip(logs[None], logs[chunk]):                      # the whole batch's means, not a chunk's
        for k in ("net/loss", "net/first_coord"):
            assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, a[k], b[k])
