"""Rectified flow and reflow (docs/methods.md §13): the flow against closed forms, its Euler sampler,
inversion and RK45 with exact velocity fields, the straightness metric against hand-computed values,
the `reflow` group's expansion, and a tiny 1-RF → pairs → 2-RF pipeline whose manifests show that
the reflow trains on exactly the upstream couplings.

The flow process's own conversions (t ↔ σ round trip, denoisers at matched noise, velocity ↔ x0)
are tested for every process in tests/test_noise.py; here they are tested through the method."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fastgen_core import metrics as M
from fastgen_core.methods import rf
from fastgen_core.noise import Flow
from stages.recipe import RecipeError, parse_recipe

C = 0.7  # data std of the Gaussian closed-form cases


class ExactVelocity(nn.Module):
    """A 'network' that returns a given velocity field v(x, t); it reads t from the label the
    method passes, so a wrong time label or direction shows up as a wrong answer."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x, t, class_labels=None):
        return self.v(x, t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)))


def flow_model(v, eps_t: float = 1e-3):
    return SimpleNamespace(nets={"net": ExactVelocity(v)}, noise=Flow(eps_t=eps_t), meta={"method": "rf"})


def gaussian_velocity(x, t):
    """Exact RF velocity for data N(0, C²I), x_t = t·x1 + (1 − t)·z: E[x1 − z | x_t] with the Gaussian
    posterior means E[x1 | x_t] = t·C²/s·x_t and E[z | x_t] = (1 − t)/s·x_t, s = t²C² + (1 − t)²."""
    s = t**2 * C**2 + (1 - t) ** 2
    return (t * C**2 - (1 - t)) / s * x


# ----------------------------------------------------------------------------- closed forms

def test_flow_denoiser_is_the_edm_posterior_mean_on_gaussian_data():
    """The flow model as an EDM x0-predictor (rf.denoiser) at σ equals D*(x, σ) = C²/(C² + σ²)·x."""
    D = rf.denoiser(flow_model(gaussian_velocity))
    sigma = torch.tensor([0.01, 0.3, 1.0, 4.0, 60.0], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    want = (C**2 / (C**2 + sigma**2))[:, None] * x
    assert torch.allclose(D(x, sigma), want, rtol=1e-9, atol=1e-12)


def test_rk45_with_the_exact_gaussian_velocity_solves_the_ode():
    """For N(0, C²) data the ODE is linear: x_t = std_t·z/std_ε with std_t = √(t²C² + (1 − t)²) when
    x(ε) = z, so RK45 from ε to 1 must return C·z/std_ε; 200 Euler steps come close."""
    eps = 1e-3
    model = flow_model(gaussian_velocity, eps)
    z = torch.randn(64, 2)
    std_eps = math.sqrt(eps**2 * C**2 + (1 - eps) ** 2)
    x, nfe = rf.ode_solve(model, z, "rk45")
    assert torch.allclose(x, C * z / std_eps, atol=2e-4) and 6 <= nfe < 500
    x_euler, n = rf.ode_solve(model, z, "euler", steps=200)
    assert n == 200 and torch.allclose(x_euler, C * z / std_eps, rtol=1e-2, atol=1e-3)
    assert not torch.allclose(rf.sample(model, z, 1), C * z / std_eps, atol=5e-2)  # one step is not enough


@pytest.mark.parametrize("nfe", [1, 2, 7])
def test_euler_with_the_exact_velocity_of_a_straight_coupling_returns_x1(nfe):
    """Straight coupling x1 = A·z0 + b: on x_t = ((1 − t)I + tA)·z0 + t·b the exact velocity is
    x1 − z0 = (A − I)·z0 + b. Euler (steps 1/N) returns x1 for any N, and inversion returns z0 (to
    float precision as ε_t → 0; RF's grid starts at ε_t, so the error is O(ε_t))."""
    A = torch.tensor([[1.5, 0.4], [-0.3, 0.8]], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64)
    I = torch.eye(2, dtype=torch.float64)

    def v(x, t):
        t = t.reshape(-1)
        M_t = (1 - t)[:, None, None] * I + t[:, None, None] * A                      # (n, 2, 2)
        z0 = torch.linalg.solve(M_t, (x - t[:, None] * b).unsqueeze(-1)).squeeze(-1)
        return z0 @ (A - I).T + b

    z0 = torch.randn(16, 2, dtype=torch.float64)
    x1 = z0 @ A.T + b
    model = flow_model(v, eps_t=1e-12)
    assert torch.allclose(rf.sample(model, z0, nfe), x1, atol=1e-9)
    assert torch.allclose(rf.invert(model, x1, nfe), z0, atol=1e-9)
    path = rf.trajectory(model, z0, nfe)
    assert path.shape == (nfe + 1, 16, 2) and M.straightness(path) < 1e-15
    # at RF's ε_t = 1e-3 the first evaluation sits at ε, not 0: off by O(ε_t), not more
    err = (rf.sample(flow_model(v, 1e-3), z0, nfe) - x1).abs().max()
    assert 1e-6 < err < 1e-2


# ----------------------------------------------------------------------------- straightness

def test_straightness_is_zero_on_a_straight_path_and_matches_hand_computed_values():
    t = torch.linspace(0, 1, 5)[:, None, None]                        # N = 4, one path in 2D
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert M.straightness(a + t * (b - a)) == pytest.approx(0, abs=1e-12)
    # parabola x(t) = (t, t²) at N = 2: chord (1, 1), segment velocities (1, 0.5) and (1, 1.5):
    # S = ½·(0.5²) + ½·(0.5²) = 0.25
    par = lambda t: torch.stack([t, t**2], -1)[:, None, :]  # noqa: E731
    assert M.straightness(par(torch.tensor([0.0, 0.5, 1.0]))) == pytest.approx(0.25)
    # fine grid: → ∫₀¹ (1 − 2t)² dt = 1/3
    assert M.straightness(par(torch.linspace(0, 1, 2001))) == pytest.approx(1 / 3, rel=1e-5)
    # a straight segment run at non-constant speed is not straight in RF's sense: x = t²·(1, 0)
    assert M.straightness(torch.stack([torch.linspace(0, 1, 2001) ** 2, torch.zeros(2001)], -1)[:, None]) \
        == pytest.approx(1 / 3, rel=1e-5)


# ----------------------------------------------------------------------------- the recipe group

NET = {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16}


def tiny(tmp_path, reflow: dict | None = None, evaluate: dict | None = None) -> dict:
    return {
        "name": "tiny_rf", "seed": 0,
        "data": {"kind": "toy", "name": "8gaussians", "n_train": 1000, "n_test": 300},
        "noise": {"process": "flow"},
        "stages": {
            "rf1": {"kind": "teacher", "method": {"name": "rf"}, "network": NET,
                    "train": {"steps": 60, "batch_size": 128, "lr": 3e-3, "ema_decay": 0.0, "log_every": 20}},
            "rfl": {"kind": "reflow", "inputs": {"teacher": "rf1"}, "rounds": 2,
                    "pairs": {"n_pairs": 64, "batch_size": 32},
                    "train": {"steps": 0, "batch_size": 32, "ema_decay": 0.0}, **(reflow or {})},
            **({"eval": {"kind": "evaluate", **evaluate}} if evaluate else {}),
        },
        "storage": {"root": str(tmp_path / "out")}, "tracking": {"enabled": False},
        "compute": {"threads": 1},
    }


def test_reflow_expands_into_pair_and_flow_stages_of_each_round(tmp_path):
    r = parse_recipe(tiny(tmp_path, {"distill": {"train": {"steps": 5}}}), "tiny.yaml")
    want = {  # name: (kind, inputs)
        "rfl_pairs1": ("ode_pairs", {"teacher": "rf1"}),
        "rfl_1": ("distill", {"pairs": "rfl_pairs1", "teacher": "rf1"}),
        "rfl_pairs2": ("ode_pairs", {"teacher": "rfl_1"}),
        "rfl": ("distill", {"pairs": "rfl_pairs2", "teacher": "rfl_1"}),
        "rfl_pairs3": ("ode_pairs", {"teacher": "rfl"}),
        "rfl_distill1": ("distill", {"pairs": "rfl_pairs1", "teacher": "rf1"}),
        "rfl_distill2": ("distill", {"pairs": "rfl_pairs2", "teacher": "rfl_1"}),
        "rfl_distill3": ("distill", {"pairs": "rfl_pairs3", "teacher": "rfl"}),
    }
    assert set(r.groups["rfl"]) == set(want) and r.groups["rfl"][-1] == "rfl"
    assert {s: (r.stages[s].kind, r.stages[s].inputs) for s in want} == want
    assert all(r.stages[s].method.t_schedule == ("t0" if "distill" in s else "uniform")
               for s in want if r.stages[s].kind == "distill")
    order = r.order()
    assert order.index("rfl_pairs1") < order.index("rfl_1") < order.index("rfl_pairs2") < order.index("rfl") \
        < order.index("rfl_pairs3") < order.index("rfl_distill3")
    # without distill: just the rounds
    assert parse_recipe(tiny(tmp_path), "tiny.yaml").groups["rfl"] == ["rfl_pairs1", "rfl_1", "rfl_pairs2", "rfl"]


@pytest.mark.parametrize("change, where", [
    (lambda r: r["stages"]["rfl"].update(inputs={}), "stages.rfl.inputs"),
    (lambda r: r["stages"]["rfl"]["method"].update(t_schedule="t0") if "method" in r["stages"]["rfl"]
     else r["stages"]["rfl"].update(method={"name": "rf", "t_schedule": "t0"}), "stages.rfl.method.t_schedule"),
    (lambda r: r["stages"]["rfl"]["pairs"].update(solver="heun"), "stages.rfl.pairs.solver"),
    (lambda r: r.update(noise={"process": "edm"}), "noise.process"),
])
def test_bad_reflow_declarations_name_the_field(tmp_path, change, where):
    raw = tiny(tmp_path)
    change(raw)
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "tiny.yaml")
    assert any(f"tiny.yaml: {where}" in p for p in e.value.problems), e.value.problems


def test_ode_pairs_refuses_a_teacher_whose_ode_it_cannot_solve(tmp_path):
    raw = tiny(tmp_path)
    raw["stages"] = {"t": {"kind": "teacher", "method": {"name": "edm"}, "network": NET, "noise": {"process": "edm"}},
                     "s": {"kind": "distill", "inputs": {"teacher": "t"}, "method": {"name": "cd"}, "noise": {"process": "edm"}},
                     "p": {"kind": "ode_pairs", "inputs": {"teacher": "s"}},
                     "q": {"kind": "ode_pairs", "inputs": {"teacher": "t"}, "pairs": {"solver": "rk45"}}}
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "tiny.yaml")
    assert any(p.startswith("tiny.yaml: stages.p.inputs.teacher: stage 's' is not an EDM model or a rectified flow")
               for p in e.value.problems), e.value.problems
    assert any(p.startswith("tiny.yaml: stages.q.pairs.solver:") for p in e.value.problems)


def test_pairs_settings_without_solver_keep_their_params_digest():
    """Stages written before `solver` existed hash the same settings as before."""
    from stages.ode_pairs import PairsConfig

    assert PairsConfig(n_pairs=5, steps=3).model_dump() == {"n_pairs": 5, "steps": 3, "batch_size": 4096}
    assert PairsConfig(solver="euler").model_dump()["solver"] == "euler"


# ----------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from stages.runtime import run_stage, stage_dir

    tmp = tmp_path_factory.mktemp("rf")
    ev = {"inputs": {"models": ["rf1", "rfl_1", "rfl"], "pairs": ["rfl_pairs2", "rfl_pairs1"]},
          "evaluate": {"n_samples": 64, "seeds": [0], "nfe": [1, 2, 4], "plots": True}}
    r = parse_recipe(tiny(tmp, evaluate=ev), str(tmp / "tiny.yaml"))
    manifests = {s: run_stage(r, s) for s in r.order()}
    return r, manifests, {s: stage_dir(r, s) for s in r.stages}


def test_ode_pairs_from_a_flow_teacher_solve_its_ode(pipeline):
    from fastgen_core.models import load_model

    r, manifests, dirs = pipeline
    with np.load(dirs["rfl_pairs1"] / "pairs.npz") as z:
        noise, sample, label = (torch.from_numpy(z[k]) for k in ("noise", "sample", "label"))
    assert noise.shape == sample.shape == (64, 2) and bool((label == -1).all())
    assert abs(float(noise.std()) - 1) < 0.25  # the standard-normal z, not a scaled one
    teacher = load_model(dirs["rf1"])
    fine = rf.sample(teacher, noise, 400)  # the same ODE by Euler, independently of RK45
    assert float((sample - fine).abs().max()) < 5e-3
    assert float((sample - noise).abs().max()) > 0.1  # the trained flow moved the noise
    assert manifests["rfl_pairs1"]["metrics"]["teacher_nfe"] > 6  # RK45 spent more than one stage


def test_reflow_trains_on_exactly_the_upstream_couplings(pipeline):
    from fastgen_core.models import load_model

    r, manifests, dirs = pipeline
    for flow, pairs, prev in [("rfl_1", "rfl_pairs1", "rf1"), ("rfl", "rfl_pairs2", "rfl_1")]:
        m = manifests[flow]
        assert m["inputs"][pairs] == {"role": "pairs", "digest": manifests[pairs]["digest"],
                                      "path": str(dirs[pairs])}
        with np.load(dirs[pairs] / "pairs.npz") as z:
            on_disk = rf.pairs_digest({k: z[k] for k in z.files})
        assert manifests[pairs]["metrics"]["pairs_digest"] == on_disk
        meta = json.loads((dirs[flow] / "model.json").read_text())
        assert meta["pairs_digest"] == on_disk and meta["couplings"] == "pairs"
        # initialised from the previous flow (0 training steps: its weights exactly)
        a, b = load_model(dirs[flow]).nets["net"], load_model(dirs[prev]).nets["net"]
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # with 0 steps the 2-RF is the 1-RF, so round 2's pair stage (same noise, seed + 1) reproduces round 1's
    assert manifests["rfl_pairs1"]["metrics"]["pairs_digest"] == manifests["rfl_pairs2"]["metrics"]["pairs_digest"]
    assert json.loads((dirs["rf1"] / "model.json").read_text())["couplings"] == "independent"


def test_evaluate_reports_coupling_inversion_and_straightness(pipeline):
    from fastgen_core.models import load_model

    r, manifests, dirs = pipeline
    res = json.loads((dirs["eval"] / "metrics.json").read_text())
    # rfl_1 was trained on rfl_pairs1 (the second pair set given): its coupling is measured there
    m = load_model(dirs["rfl_1"])
    with np.load(dirs["rfl_pairs1"] / "pairs.npz") as z:
        noise, target = torch.from_numpy(z["noise"]), torch.from_numpy(z["sample"])
    for k in (1, 2, 4):
        want = M.mean_sq_distance(rf.sample(m, noise, k), target)
        assert res["rfl_1"]["coupling"][f"nfe_{k}"] == pytest.approx(want, abs=2e-6)
    assert res["rfl_1"]["coupling"]["mse"] == res["rfl_1"]["coupling"]["nfe_1"]
    x = load_model(dirs["rf1"])
    from fastgen_core.data import cached_data

    data = cached_data(r.data).x_test[:2000]
    want = M.mean_sq_distance(rf.sample(x, rf.invert(x, data, 2), 2), data)
    assert res["rf1"]["inversion"]["nfe_2"] == pytest.approx(want, abs=2e-6)
    # straightness of the K-step Euler paths from the evaluation's fixed noise (2000 standard-normal
    # draws, generator seed 40000), recomputed without `trajectory` or `metrics.straightness`: an
    # Euler path moves by v_i/N on step i, so Ż = v_i there and the chord Z1 − Z0 is the mean of the
    # v_i; S = (1/N)·Σ_i E‖mean(v) − v_i‖² is the per-sample variance of the step velocities, summed
    # over dimensions, averaged over samples
    z = torch.randn((2000, 2), generator=torch.Generator().manual_seed(40_000))
    for row in ("rf1", "rfl_1", "rfl"):
        assert set(res[row]["straightness"]) == {"nfe_2", "nfe_4"}
        net = load_model(dirs[row]).nets["net"]
        for N in (2, 4):
            x, vs = z.clone(), []
            with torch.no_grad():
                for i in range(N):
                    vs.append(net(x, torch.full((len(x),), i / N * (1 - 1e-3) + 1e-3)))  # t_i on RF's grid, ε_t = 1e-3
                    x = x + vs[-1] / N
            want = float(torch.stack(vs).double().var(dim=0, unbiased=False).sum(-1).mean())
            assert want > 1e-3  # the trained flow is not straight: a value check, not 0 against 0
            assert res[row]["straightness"][f"nfe_{N}"] == pytest.approx(want, rel=1e-4, abs=2e-6), (row, N)
    flat = manifests["eval"]["metrics"]
    assert flat["rfl.straightness.nfe_4"] == res["rfl"]["straightness"]["nfe_4"]
    assert (dirs["eval"] / "plots" / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
