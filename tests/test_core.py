"""Faithfulness of the core math: Karras grid, EDM preconditioning, the time-convention
conversions, the analytic mixture denoiser, Heun sampling, the CM boundary condition; and the one
loop: it resumes exactly from its checkpoint (every random state, CUDA's when in use, every
worker's), stops on a non-finite loss keeping the last finite checkpoint, and its gradient
all-reduce holds with workers whose loss leaves a parameter unused (two gloo processes)."""
from __future__ import annotations

import math

import pytest
import torch

from fastgen_core import loop, metrics as M
from fastgen_core.config import DataConfig, NetworkConfig
from fastgen_core.data import load_data
from fastgen_core.methods import cd, edm
from fastgen_core.methods.base import Context
from fastgen_core.noise import EDM, denoiser_in, from_edm, to_edm
from fastgen_core.config import TrainConfig
from fastgen_core.samplers import edm_sample, teacher_nfe

torch.set_default_dtype(torch.float32)


def test_karras_grid_formula():
    e = EDM()
    s = e.karras_sigmas(18).double()
    assert s[0].item() == pytest.approx(80.0, rel=1e-6) and s[-1].item() == pytest.approx(0.002, rel=1e-5)
    i = 5
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(want, rel=1e-6)
    assert bool((s[1:] < s[:-1]).all())


def test_edm_precond_values():
    e = EDM()
    c_skip, c_out, c_in, c_noise = e.precond(torch.tensor(1.0))
    assert c_skip.item() == pytest.approx(0.25 / 1.25)
    assert c_out.item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(1.25))
    assert c_noise.item() == pytest.approx(0.0)
    assert e.loss_weight(torch.tensor(1.0)).item() == pytest.approx(1.25 / 0.25)


@pytest.mark.parametrize("conv", ["edm", "trigflow", "fm", "vp"])
def test_time_conversion_round_trip(conv):
    t = {"edm": torch.tensor([0.01, 1.0, 50.0]), "trigflow": torch.tensor([0.01, 0.7, 1.5]),
         "fm": torch.tensor([0.01, 0.5, 0.98]), "vp": torch.tensor([0.02, 0.5, 0.95])}[conv].double()
    a, sigma = to_edm(conv, t)
    assert torch.allclose(from_edm(conv, sigma), t, atol=1e-6)


@pytest.mark.parametrize("conv", ["trigflow", "fm", "vp"])
def test_denoisers_agree_at_matched_noise(conv):
    """For data N(0, c²): the EDM-optimal denoiser, wrapped into `conv`, equals the optimal
    denoiser derived directly in `conv`'s own forward process x_t = α x0 + β n."""
    c, sd = 0.7, 0.5
    D_edm = lambda x, s, **k: c**2 / (c**2 + s.reshape(-1, 1) ** 2) * x  # noqa: E731
    D = denoiser_in(conv, D_edm, sd)
    t = {"trigflow": torch.tensor([0.3, 1.2]), "fm": torch.tensor([0.2, 0.9]), "vp": torch.tensor([0.3, 0.8])}[conv]
    if conv == "trigflow":
        alpha, beta = t.cos(), t.sin() * sd
    elif conv == "fm":
        alpha, beta = 1 - t, t
    else:
        from fastgen_core.noise import vp_gamma
        g = vp_gamma(t)
        alpha, beta = g.sqrt(), (1 - g).sqrt()
    x = torch.randn(2, 3)
    want = (alpha * c**2 / (alpha**2 * c**2 + beta**2)).reshape(-1, 1) * x
    assert torch.allclose(D(x, t), want, atol=1e-5)


def test_analytic_denoiser_is_posterior_mean():
    d = load_data(DataConfig(kind="toy", name="8gaussians", n_train=200, n_test=200)).density
    x0, _ = d.sample(200_000, torch.Generator().manual_seed(0))
    sigma = 0.3
    x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    near = (x - torch.tensor([1.0, 0.2])).norm(dim=1) < 0.05  # Monte-Carlo E[x0 | x ≈ point]
    mc = x0[near].mean(0)
    exact = d.denoiser(torch.tensor([[1.0, 0.2]]), torch.tensor(sigma))[0]
    assert torch.allclose(mc, exact, atol=0.02)


def test_heun_with_exact_denoiser_samples_the_mixture():
    data = load_data(DataConfig(kind="toy", name="8gaussians", n_train=100, n_test=4000))
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    D = lambda x, s, **k: data.density.denoiser(x, s)  # noqa: E731
    good = M.toy_metrics(edm_sample(D, z, EDM(), 18), data.density, data.x_test)
    bad = M.toy_metrics(edm_sample(D, z, EDM(), 1, "euler"), data.density, data.x_test)
    assert good["mode_coverage"] == 1.0 and good["off_support"] < 0.05 and good["nll"] < -0.9
    assert bad["off_support"] > 0.9  # one Euler step lands on the mean of everything
    assert teacher_nfe(35) == 35 and teacher_nfe(3) == 3 and teacher_nfe(4) == 3


def test_consistency_boundary_condition_exact():
    net_cfg = NetworkConfig(arch="mlp", width=16, depth=1, emb_dim=8)
    from fastgen_core.nets import build_network
    net = build_network(net_cfg, (2,))
    torch.nn.init.normal_(net.out.weight)
    e = EDM()
    f = cd.ConsistencyFn(net, e)
    x = torch.randn(64, 2)
    assert torch.equal(f(x, torch.tensor(e.sigma_min)), x)
    assert not torch.allclose(f(x, torch.tensor(1.0)), x)


def _toy_method(seed=0, device="cpu", cls=None):
    data = load_data(DataConfig(kind="toy", name="8gaussians", n_train=500, n_test=100))
    torch.manual_seed(seed)
    return (cls or edm.Method)(edm.Config(), Context(data, EDM(), NetworkConfig(arch="mlp", width=16, depth=1, emb_dim=8),
                                                     device=torch.device(device)))


def test_loop_resume_is_exact(tmp_path):
    cfg = TrainConfig(steps=20, batch_size=32, ckpt_every=10, log_every=5)
    full = loop.train(_toy_method(), cfg, tmp_path / "a", progress=False)
    # crash after 10 steps, then resume to 20 from the checkpoint
    loop.train(_toy_method(), cfg.model_copy(update={"steps": 10}), tmp_path / "b", progress=False)
    resumed = loop.train(_toy_method(), cfg, tmp_path / "b", progress=False)
    for k in full["net"]:
        assert torch.equal(full["net"][k], resumed["net"][k]), k
    # and the checkpoint holds tensors only (weights_only loading)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert state["step"] == 20


def test_loop_steps_groups_at_their_rates():
    """A method with two optimiser groups stepping every 1 and every 5 iterations."""
    from fastgen_core.methods.base import Group

    class TwoRates(edm.Method):
        def __init__(self, *a):
            super().__init__(*a)
            self.add_net("slow", self.ctx.network)
            self.calls = {"net": 0, "slow": 0}

        def groups(self):
            return [Group("net", list(self.nets["net"].parameters())),
                    Group("slow", list(self.nets["slow"].parameters()), every=5)]

        def loss(self, group, batch, step):
            self.calls[group] += 1
            return self.nets[group](batch["x"], torch.zeros(len(batch["x"]))).pow(2).mean() + \
                sum(p.pow(2).sum() for p in self.nets[group].parameters()) * 1e-3, {}

    m = _toy_method()
    m2 = TwoRates(m.cfg, m.ctx)
    before = {k: v.clone() for k, v in m2.nets["net"].state_dict().items()}
    loop.train(m2, TrainConfig(steps=10, batch_size=16), None, progress=False)
    assert m2.calls == {"net": 10, "slow": 2}
    assert any(not torch.equal(before[k], v) for k, v in m2.nets["net"].state_dict().items())


class NaNAt(edm.Method):
    """The EDM loss, made NaN from step `nan_at` on (a stand-in for a diverging run)."""

    nan_at = 13

    def loss(self, group, batch, step):
        loss, logs = super().loss(group, batch, step)
        return (loss * float("nan") if step >= self.nan_at else loss), logs


def test_nonfinite_loss_stops_with_step_group_and_last_finite_checkpoint(tmp_path):
    cfg = TrainConfig(steps=20, batch_size=32, ckpt_every=5, log_every=5)
    with pytest.raises(loop.NonFiniteLoss) as e:
        loop.train(_toy_method(cls=NaNAt), cfg, tmp_path / "b", progress=False)
    ckpt = tmp_path / "b" / "last.pt"
    assert (e.value.step, e.value.group, e.value.checkpoint_step, e.value.checkpoint) == (13, "net", 10, ckpt)
    assert str(e.value) == f"non-finite loss (nan) at step 13 in optimiser group 'net'; " \
                           f"last finite checkpoint (step 10) kept in {ckpt}"
    assert loop.checkpoint_step(tmp_path / "b") == 10
    # the kept checkpoint resumes to exactly the run that never failed
    resumed = loop.train(_toy_method(), cfg, tmp_path / "b", progress=False)
    full = loop.train(_toy_method(), cfg, tmp_path / "a", progress=False)
    assert all(torch.equal(full["net"][k], resumed["net"][k]) for k in full["net"])
    with pytest.raises(loop.NonFiniteLoss, match="no checkpoint written yet"):
        loop.train(_toy_method(cls=NaNAt), cfg.model_copy(update={"ckpt_every": 50}), tmp_path / "c", progress=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: GPU-exact resume not checked here"))])
def test_checkpoint_holds_every_random_state(tmp_path, device):
    """The EDM loss draws σ and n from torch's generator of the device the method runs on: the
    checkpoint keeps CUDA's generators (all devices) exactly when CUDA is in use, and resuming from
    it is bit-exact on either device."""
    cfg = TrainConfig(steps=20, batch_size=32, ckpt_every=10, log_every=5)
    full = loop.train(_toy_method(device=device), cfg, tmp_path / "a", progress=False)
    loop.train(_toy_method(device=device), cfg.model_copy(update={"steps": 10}), tmp_path / "b", progress=False)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    (rngs,) = state["rng_states"]  # one worker
    assert set(rngs) == {"gen", "rng", "cuda"}  # `cuda` always there, empty when CUDA is not in use
    assert len(rngs["cuda"]) == (torch.cuda.device_count() if device == "cuda" else 0)
    resumed = loop.train(_toy_method(device=device), cfg, tmp_path / "b", progress=False)
    assert all(torch.equal(full["net"][k], resumed["net"][k]) for k in full["net"])


class RankSkips(edm.Method):
    """Two networks; on worker 1 the loss never reaches the second (unused there), and from step
    `nan_at` worker 1's loss is NaN."""

    nan_at = 10**9

    def __init__(self, *a):
        super().__init__(*a)
        self.add_net("aux", self.ctx.network)

    def groups(self):
        from fastgen_core.methods.base import Group

        return [Group("net", [*self.nets["net"].parameters(), *self.nets["aux"].parameters()])]

    def loss(self, group, batch, step):
        loss, logs = super().loss(group, batch, step)
        rank = torch.distributed.get_rank()
        if rank == 0:
            loss = loss + self.nets["aux"](batch["x"], torch.ones(len(batch["x"]))).pow(2).mean()
        return (loss * float("nan") if rank == 1 and step >= self.nan_at else loss), logs


def _ddp_worker(rank: int, folder: str) -> None:
    """One of two gloo workers: the all-reduce with a parameter unused on worker 1, a NaN on worker
    1 only, and an interrupted-and-resumed run against an uninterrupted one; results to files."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(rank + 1))
    b.grad = torch.tensor([4.0, 8.0]) if rank == 0 else None
    loop._allreduce_grads([a, b], 2)
    out["a"], out["b"] = a.grad.clone(), b.grad.clone()

    cfg = TrainConfig(steps=12, batch_size=32, ckpt_every=6, log_every=6)
    out["full"] = loop.train(_toy_method(cls=RankSkips), cfg, f"{folder}/full", progress=False)
    loop.train(_toy_method(cls=RankSkips), cfg.model_copy(update={"steps": 6}), f"{folder}/cut", progress=False)
    out["resumed"] = loop.train(_toy_method(cls=RankSkips), cfg, f"{folder}/cut", progress=False)
    RankSkips.nan_at = 8
    try:
        loop.train(_toy_method(cls=RankSkips), cfg, f"{folder}/nan", progress=False)
    except loop.NonFiniteLoss as e:
        out["nan"] = str(e)
    dist.destroy_process_group()
    torch.save(out, f"{folder}/rank{rank}.pt")


def test_allreduce_with_a_parameter_unused_on_one_worker_and_exact_resume_on_two(tmp_path):
    """Two gloo processes: a parameter with no gradient on worker 1 contributes zeros (averaged
    gradient (g0 + 0)/2 on both) instead of desynchronising the collective; a NaN on worker 1 stops
    both at the same step; a run resumed from its checkpoint equals the uninterrupted one on both
    workers (each takes back its own random states)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    t_end = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > t_end:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo workers hung")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert torch.equal(r["a"], torch.full((3,), 1.5)) and torch.equal(r["b"], torch.tensor([2.0, 4.0]))
        for k in r["full"]["net"]:
            assert torch.equal(r["full"]["net"][k], r["resumed"]["net"][k]), k
    assert all(torch.equal(r0["full"]["net"][k], r1["full"]["net"][k]) for k in r0["full"]["net"])  # replicas agree
    assert r1["nan"] == f"non-finite loss (nan) at step 8 in optimiser group 'net'; " \
                        f"last finite checkpoint (step 6) kept in {tmp_path / 'nan' / 'last.pt'}"
    assert r0["nan"].startswith("non-finite loss on another worker at step 8 in optimiser group 'net'")
