"""Guided distillation (docs/methods.md §9): the w-student's target is classifier-free guidance and the
student starts as the teacher; training moves it onto the CFG combination across w; one progressive
round's x-target, stepped once with DDIM, lands where the teacher's two DDIM steps land (transcribed
in the log-SNR form of the public progressive-distillation code); a sampler of oracle students
(each the exact round target) reproduces the teacher's 2N-step samples with N steps; the
`progressive` group expands into one chained stage per round in the flow's stage list and dvc.yaml."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastgen_core import loop
from fastgen_core.config import DataConfig, NetworkConfig, TrainConfig
from fastgen_core.data import load_data
from fastgen_core.methods import guided, progressive
from fastgen_core.methods.base import Context
from fastgen_core.models import LoadedModel
from fastgen_core.nets import build_network
from fastgen_core.noise import EDM, VPCosine
from fastgen_core.samplers import cfg_guided
from stages.recipe import RecipeError, parse_recipe

NCFG = NetworkConfig(arch="mlp", width=32, depth=2, emb_dim=16)
VP = VPCosine(s=2e-4, d=8.223e-3)  # σ(1) = 80, as params/digits_guided.yaml


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(kind="toy", name="8gaussians", conditional=True, n_train=1000, n_test=100))


def _teacher(data, label_dropout=0.1, seed=0) -> LoadedModel:
    """A fixed class-conditional EDM teacher: a random network whose output layer is not zero, so
    its conditional and unconditional predictions differ."""
    torch.manual_seed(seed)
    net = build_network(NCFG, data.shape, data.num_classes)
    with torch.no_grad():
        nn.init.normal_(net.out.weight, std=0.5)
        nn.init.normal_(net.out.bias, std=0.2)
        nn.init.normal_(net.embed.map_label.weight, std=1.0)
    meta = {"method": "edm", "method_config": {"name": "edm", "label_dropout": label_dropout},
            "networks": {"net": NCFG.model_dump(mode="json")}, "num_classes": data.num_classes,
            "shape": list(data.shape)}
    return LoadedModel(meta, nn.ModuleDict({"net": net.eval().requires_grad_(False)}), EDM())


def _point(data, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = data.x[:n]
    t = torch.rand(n, generator=g) * 0.98 + 0.01
    z_t = VP.forward(x0, t, torch.randn(x0.shape, generator=g))
    return z_t, t, data.y[:n]


# ----------------------------------------------------------------------------- stage 1

def test_w_student_target_is_cfg_and_the_student_starts_as_the_teacher(data):
    teacher = _teacher(data)
    m = guided.Method(guided.Config(), Context(data, VP, None, {"teacher": teacher}))
    z_t, t, y = _point(data)
    # independent transcription: samplers.cfg_guided writes D(∅) + w'·(D(c) − D(∅)) with w' = 1 + w,
    # on the teacher's own EDM denoiser queried at the matched level x = z_t/α_t, σ = β_t/α_t
    a, sigma = VP.to_edm(t)
    x_edm = z_t / a[:, None]
    x_c = teacher.denoiser()(x_edm, sigma, class_labels=y)
    for w in [0.0, 0.5, 1.0, 2.7, 4.0, torch.linspace(0, 4, len(y))]:
        w_vec = guided.per_sample(w, z_t)
        want = torch.stack([cfg_guided(teacher.denoiser(), 1 + float(wi), data.num_classes)(
            x_edm[i:i + 1], sigma[i:i + 1], class_labels=y[i:i + 1])[0] for i, wi in enumerate(w_vec)])
        got = m.target(z_t, t, y, w_vec)
        assert torch.allclose(got, want, atol=1e-5), (w, (got - want).abs().max())
        # at initialisation the student is the teacher's conditional prediction for every w, i.e.
        # the guided prediction at w = 0, off from x̂^w by exactly w·(x̂_c − x̂_∅)
        with torch.no_grad():
            s = m.x_student(z_t, t, class_labels=y, w=w_vec)
        assert torch.allclose(s, x_c, atol=1e-5)
        x_u = teacher.denoiser()(x_edm, sigma, class_labels=torch.full_like(y, data.num_classes))
        assert torch.allclose(got - s, w_vec[:, None] * (x_c - x_u), atol=1e-4)
    assert (x_c - x_u).abs().mean() > 0.01  # the check is not vacuous: guidance changes the prediction


def test_w_student_training_moves_onto_the_cfg_combination_across_w(data):
    teacher = _teacher(data)
    m = guided.Method(guided.Config(w_min=0.0, w_max=4.0), Context(data, VP, None, {"teacher": teacher}))
    z_t, t, y = _point(data, n=256, seed=3)

    def err(w):
        with torch.no_grad():
            return float(((m.x_student(z_t, t, class_labels=y, w=w) - m.target(z_t, t, y, w)) ** 2).mean())

    before = {w: err(w) for w in (1.0, 3.0)}
    assert err(0.0) < 1e-10 < before[1.0] < before[3.0]
    torch.manual_seed(0)
    loop.train(m, TrainConfig(steps=150, batch_size=64, lr=3e-3, ema_decay=0.0, ckpt_every=10**6),
               progress=False)
    for w in (1.0, 3.0):  # the w-embedding learned the guidance (measured: ~20x lower)
        assert err(w) < before[w] / 4, (w, before[w], err(w))


def test_guided_warns_of_a_teacher_without_an_unconditional_mode(data):
    with pytest.warns(UserWarning, match="label_dropout"):
        guided.Method(guided.Config(), Context(data, VP, None, {"teacher": _teacher(data, label_dropout=0.0)}))


# ----------------------------------------------------------------------------- stage 2

def _gaussian_teacher(mu: torch.Tensor, s: float):
    """Exact x-prediction of data N(μ, s²I) under z = α·x + β·ε: E[x|z] = μ + α·s²/(α²s² + β²)·(z − α·μ)
    (linear in z)."""
    def D(z, t, **cond):
        a, b = VP.alpha_beta(guided.per_sample(t, z).double())
        a, b = a[:, None], b[:, None]
        return mu + a * s**2 / (a**2 * s**2 + b**2) * (z - a * mu)
    return D


def _pd_ab(t: torch.Tensor):
    """α, σ of the public progressive-distillation code, from the log-SNR: α = √sigmoid(λ), σ = √sigmoid(−λ)."""
    a, b = VP.alpha_beta(t.double())
    lam = torch.log(a**2 / b**2)
    return torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]


def _pd_ddim(D, z, t, s):
    """One DDIM step as the public code's `ddim_step`: z_s = α_s·x̂ + σ_s·(z_t − α_t·x̂)/σ_t."""
    x = D(z, t)
    (a_t, s_t), (a_s, s_s) = _pd_ab(t), _pd_ab(s)
    return a_s * x + s_s * (z - a_t * x) / s_t


@pytest.mark.parametrize("N", [1, 2, 8])
def test_one_student_step_on_the_target_lands_where_two_teacher_steps_land(N):
    torch.manual_seed(0)
    mu, n = torch.tensor([[0.7, -1.2]], dtype=torch.float64), 200
    D = _gaussian_teacher(mu, 0.4)
    i = torch.randint(N, (n,))
    t, t_mid, s = (i + 1).double() / N, (i + 0.5).double() / N, i.double() / N
    z_t = torch.randn(n, 2, dtype=torch.float64)
    target = progressive.teacher_target(D, VP, z_t, i, N)
    z_two = _pd_ddim(D, _pd_ddim(D, z_t, t, t_mid), t_mid, s)
    z_one = _pd_ddim(lambda z, tt: target, z_t, t, s)
    last = i == 0  # the step to data: the target is the teacher's last x-prediction
    assert torch.allclose(z_one[~last], z_two[~last], atol=1e-9, rtol=0)
    assert torch.allclose(target[last], D(_pd_ddim(D, z_t, t, t_mid), t_mid)[last], atol=1e-12)
    if N > 1:
        assert (~last).sum() > 0 and ((target - D(z_t, t)).abs().max() > 1e-3)  # not simply the teacher


def test_a_student_equal_to_an_exact_one_step_teacher_has_zero_target_error():
    """Point-mass data: x̂ = μ at every t, DDIM is exact, so the target is μ and a student equal to the
    teacher is already perfect (a wrong target formula would move it)."""
    mu = torch.tensor([[0.3, -0.8]], dtype=torch.float64)
    z_t = torch.randn(50, 2, dtype=torch.float64)
    for N in (1, 4):
        i = torch.randint(N, (50,))
        target = progressive.teacher_target(lambda z, t, **c: mu.expand_as(z), VP, z_t, i, N)
        assert torch.allclose(target, mu.expand_as(z_t), atol=1e-10)


@pytest.mark.parametrize("N", [1, 2, 4])
def test_oracle_students_sample_in_n_steps_what_the_teacher_samples_in_2n(N):
    """A student whose x-prediction is exactly the round target, sampled with N DDIM steps on the
    process grid, reproduces the teacher's 2N-step samples from the same noise."""
    mu = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    D = _gaussian_teacher(mu, 0.4)

    def oracle(z, t, **cond):
        i = (guided.per_sample(t, z) * N).round().long() - 1
        return progressive.teacher_target(D, VP, z, i, N)

    z = torch.randn(100, 2, dtype=torch.float64)
    two = guided.ddim_sample(D, VP, z, 2 * N)
    one = guided.ddim_sample(oracle, VP, z, N)
    assert torch.allclose(one, two, atol=1e-9)
    assert (guided.ddim_sample(D, VP, z, N) - two).abs().max() > 1e-4  # the teacher itself at N steps differs


def test_progressive_round_starts_from_its_w_conditioned_teacher(data):
    teacher = _teacher(data)
    g = guided.Method(guided.Config(), Context(data, VP, None, {"teacher": teacher}))
    with torch.no_grad():
        nn.init.normal_(g.nets["net"].embed.map_w.weight, std=0.5)  # a w-student whose w matters
    wmeta = {"method": "guided", "method_config": g.cfg.model_dump(mode="json"), "sigma_data": 0.5,
             "networks": {"net": g.net_cfgs["net"].model_dump(mode="json")}, "num_classes": data.num_classes,
             "shape": list(data.shape)}
    wstudent = LoadedModel(wmeta, nn.ModuleDict({"net": copy.deepcopy(g.nets["net"]).eval()}), VP)
    m = progressive.Method(progressive.Config(N=4), Context(data, VP, None, {"teacher": wstudent}))
    assert m.w_cond and m.net_cfgs["net"].scalar_cond
    z_t, t, y = _point(data)
    for w in (0.0, 2.0):
        with torch.no_grad():
            assert torch.equal(m.x_student(z_t, t, class_labels=y, w=torch.full((len(y),), w)),
                               m.x_teacher(z_t, t, class_labels=y, w=torch.full((len(y),), w)))
    # and the saved model samples at the w it is asked for
    meta = {**wmeta, "method": "progressive", "method_config": m.cfg.model_dump(mode="json"), "N": 4}
    model = LoadedModel(meta, m.nets, VP)
    z = torch.randn(16, *data.shape)
    a, b = (progressive.sample(model, z, 4, data.y[:16], w=w) for w in (0.0, 3.0))
    assert (a - b).abs().max() > 1e-3


# ----------------------------------------------------------------------------- the group

def _recipe(**pd):
    return {"name": "g", "data": {"kind": "toy", "conditional": True},
            "stages": {
                "teacher": {"kind": "teacher", "method": {"name": "edm", "label_dropout": 0.1},
                            "network": {"arch": "mlp", "width": 16, "depth": 1, "emb_dim": 8}},
                "wstudent": {"kind": "distill", "inputs": {"teacher": "teacher"}, "method": {"name": "guided"},
                             "noise": {"process": "vp_cosine"}},
                "pd": {"kind": "progressive", "inputs": {"teacher": "wstudent"},
                       "rounds": {"teacher_steps": 16, "student_steps": 2}, "noise": {"process": "vp_cosine"},
                       "train": {"steps": 7}, **pd},
                "eval": {"kind": "evaluate", "inputs": {"models": ["pd_4", "pd"]}}}}


def test_progressive_group_expands_into_chained_rounds_in_the_flow_and_dvc():
    from stages.dvcgen import stage_entry

    r = parse_recipe(_recipe(), "g.yaml")
    assert r.groups == {"pd": ["pd_8", "pd_4", "pd"]}
    flow_order = r.order()  # the Prefect flow runs recipe.order()
    assert flow_order.index("wstudent") < flow_order.index("pd_8") < flow_order.index("pd_4") \
        < flow_order.index("pd") < flow_order.index("eval")
    teachers, Ns = ["wstudent", "pd_8", "pd_4"], [8, 4, 2]
    for member, teacher, N in zip(r.groups["pd"], teachers, Ns):
        st = r.stages[member]
        assert (st.kind, st.method.name, st.method.N, st.inputs, st.train.steps, st.train.lr_schedule) == \
            ("distill", "progressive", N, {"teacher": teacher}, 7, "linear_decay")  # the paper's anneal by default
        entry = stage_entry(r, "params/g.yaml", member, {"stages"})
        assert entry["cmd"] == f"python -m stages.run params/g.yaml {member}"
        assert f"outputs/g/{teacher}" in entry["deps"] and entry["outs"] == [f"outputs/g/{member}"]
        assert entry["params"] == [{"params/g.yaml": ["stages.pd"]}]
        assert "fastgen_core/methods/progressive.py" in entry["deps"] and "stages/progressive.py" in entry["deps"]
    # the shipped recipe, in the generated dvc.yaml: 64 -> 32 -> … -> 1
    import yaml
    from stages.dvcgen import PROJECT
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    chain = ["wstudent", "pd_32", "pd_16", "pd_8", "pd_4", "pd_2", "pd"]
    for up, member in zip(chain, chain[1:]):
        assert f"outputs/digits_guided/{up}" in dvc[f"digits_guided-{member}"]["deps"]


def test_progressive_group_keeps_an_lr_schedule_it_is_given():
    r = parse_recipe(_recipe(train={"steps": 7, "lr_schedule": "constant"}), "g.yaml")
    assert {r.stages[m].train.lr_schedule for m in r.groups["pd"]} == {"constant"}


@pytest.mark.parametrize("schedule,warmup", [("constant", 0), ("linear_decay", 0), ("linear_decay", 4)])
def test_lr_schedule_through_the_loop_matches_the_closed_form(schedule, warmup):
    """The loop's `lr_schedule` (progressive distillation anneals lr linearly to 0 within a round):
    with loss = Σθ every gradient is 1 at every step, so each Adam step (m̂ = v̂ = 1) moves every
    parameter by lr_k/(1 + eps), and after S steps θ_0 − θ_S = Σ_k lr_k in closed form."""
    from fastgen_core.methods import edm

    class Linear(edm.Method):
        def loss(self, group, batch, step):
            return sum(p.sum() for p in self.nets["net"].parameters()), {}

    d = load_data(DataConfig(kind="toy", name="8gaussians", n_train=64, n_test=16))
    m = Linear(edm.Config(), Context(d, EDM(), NetworkConfig(arch="mlp", width=8, depth=1, emb_dim=4)))
    before = [p.detach().clone() for p in m.nets["net"].parameters()]
    S, W, lr = 20, warmup, 1e-2
    loop.train(m, TrainConfig(steps=S, batch_size=8, lr=lr, lr_warmup=W, lr_schedule=schedule), None, progress=False)
    if schedule == "constant":
        total = S
    elif W == 0:  # Σ_{k<S} (1 − k/S) = (S + 1)/2
        total = (S + 1) / 2
    else:  # Σ_{k<W} (k + 1)/W·(1 − k/S) + Σ_{W≤k<S} (1 − k/S)
        total = (W + 1) / 2 - (W * W - 1) / (3 * S) + (S - W) - (S - W) * (S + W - 1) / (2 * S)
    for p0, p in zip(before, m.nets["net"].parameters()):
        assert torch.allclose(p0 - p.detach(), torch.full_like(p0, lr * total), rtol=1e-5), (schedule, W)


@pytest.mark.parametrize("pd,field", [
    ({"rounds": {"teacher_steps": 12, "student_steps": 1}}, "stages.pd.rounds.student_steps"),
    ({"rounds": {"teacher_steps": 2, "student_steps": 2}}, "stages.pd.rounds.student_steps"),
    ({"method": {"N": 4}}, "stages.pd.method.N"),
    ({"inputs": {"student": "wstudent"}}, "stages.pd.inputs"),
    ({"train": {"steps": 7, "lr_schedule": "cosine"}}, "stages.pd.train.lr_schedule"),
])
def test_bad_progressive_groups_name_the_field(pd, field):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_recipe(**pd), "g.yaml")
    assert any(p.startswith(f"g.yaml: {field}: ") for p in e.value.problems), e.value.problems


def test_w_rows_need_a_w_conditioned_model():
    raw = _recipe()
    raw["stages"]["eval"]["evaluate"] = {"guidance": [{"kind": "w", "main": "teacher", "w": 1.0}]}
    raw["stages"]["eval"]["inputs"]["other"] = ["teacher"]
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "g.yaml")
    assert any(p.startswith("g.yaml: stages.eval.evaluate.guidance.0.main: ") for p in e.value.problems)
    raw["stages"]["eval"]["evaluate"]["guidance"][0]["main"] = "pd"
    r = parse_recipe(raw, "g.yaml")
    assert r.stages["eval"].evaluate.guidance[0].row == "pd_w1"
    assert math.isclose(r.stages["eval"].evaluate.guidance[0].w, 1.0)
