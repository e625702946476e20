"""Multi-Student Distillation (docs/methods.md §8): the `students` group kind (stages/students.py),
the router (fastgen_core/methods/router.py), a student's class subset (stages/train.py `classes`) and
Teacher Score Matching (fastgen_core/methods/tsm.py).

- partition: contiguous and explicit groups are disjoint, cover every class and have equal sizes
  (up to one class), else recipe validation says so in one line;
- the router sends each class to its student: students that return a distinct constant each,
  combined, saved and loaded as a model folder; every sample of class c carries the constant of
  the student owning c (an explicit, non-contiguous partition too);
- one declaration expands into K student stages in dvc.yaml (as generated from params/) and in a
  real Prefect flow run (tests/test_recipes.py's run of the shrunk recipe, read back from Prefect's
  task runs): each router waits on its K students and starts after they end;
- a student trains only on its classes (the method's training tensors), with every input pair set
  unfiltered;
- TSM moves a small random network towards the teacher's denoiser on noised real data.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from fastgen_core import loop
from fastgen_core.config import DataConfig, NetworkConfig, Strict, TrainConfig
from fastgen_core.data import cached_data
from fastgen_core.methods import get_method, register_method, unregister_method
from fastgen_core.methods import router as R
from fastgen_core.methods.base import Context, Method
from fastgen_core.models import load_model, save_model, save_resume
from fastgen_core.noise import EDM
from stages.recipe import RecipeError, parse_recipe

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TINY = {"arch": "mlp", "width": 16, "depth": 1, "emb_dim": 8}
DIGITS = DataConfig(kind="digits", conditional=True)


def recipe(students: dict, **extra) -> dict:
    """A digits recipe: a teacher and one `students` group (dmd2 students), evaluated."""
    group = {"kind": "students", "inputs": {"teacher": "teacher"}, "students": students,
             "method": {"name": "dmd2"}, "train": {"steps": 2}, **extra}
    return {"name": "msd_test", "data": {"kind": "digits", "conditional": True},
            "stages": {"features": {"kind": "feature_net", "method": {"name": "classifier"}},
                       "teacher": {"kind": "teacher", "method": {"name": "edm"}, "network": TINY},
                       "msd": group,
                       "eval": {"kind": "evaluate", "inputs": {"models": ["msd"], "features": "features"}}},
            "tracking": {"enabled": False}}


def problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml")
    return e.value.problems


# ----------------------------------------------------------------------------- partition

def test_contiguous_groups_are_consecutive_runs_of_equal_size():
    assert R.contiguous(10, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert R.contiguous(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    four = R.contiguous(10, 4)                               # 10 classes: sizes 2 or 3
    assert sorted(c for g in four for c in g) == list(range(10))
    assert all(g == list(range(g[0], g[-1] + 1)) for g in four) and {len(g) for g in four} == {2, 3}
    r = parse_recipe(recipe({"k": 4}))
    assert r.groups["msd"] == ["msd_0", "msd_1", "msd_2", "msd_3", "msd"]
    assert [r.stages[f"msd_{k}"].classes for k in range(4)] == four
    assert r.stages["msd"].method.classes == four and r.stages["msd"].train.steps == 0


def test_explicit_partition_is_kept_and_checked():
    groups = [[1, 3, 5, 7, 9], [0, 2, 4, 6, 8]]
    r = parse_recipe(recipe({"k": 2, "partition": groups}))
    assert [r.stages[f"msd_{k}"].classes for k in range(2)] == groups
    bad = {
        "more than one group": [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]],       # overlap
        "in no group": [[0, 1, 2, 3], [4, 5, 6, 7]],                      # 8, 9 uncovered
        "do not exist": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 10]],              # 9 uncovered, 10 unknown
        "equal size": [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]],                 # sizes 3 and 7
        "groups of classes for k = 2": [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]],
    }
    for msg, partition in bad.items():
        probs = problems(recipe({"k": 2, "partition": partition}))
        assert len(probs) == 1 and probs[0].startswith("r.yaml: stages.msd.students") and msg in probs[0], probs
    probs = problems(recipe({"k": 11}))                                   # more students than classes
    assert len(probs) == 1 and "stages.msd.students.partition" in probs[0] and "11 students for 10" in probs[0], probs


def test_group_settings_are_validated_in_one_line():
    cases = {
        "network": recipe({"k": 2, "size": "smaller"}),                  # smaller without a network
        "tsm": recipe({"k": 2}, tsm={"train": {"steps": 2}}),             # TSM for same-size students
        "gan.method": recipe({"k": 2}, gan={"method": {"name": "dmd"}}),  # the phase changes the method's name
        "inputs": {**recipe({"k": 2}), "stages": {**recipe({"k": 2})["stages"], "msd": {
            **recipe({"k": 2})["stages"]["msd"], "inputs": {"teacher": "teacher", "students": "teacher"}}}},
    }
    for field, raw in cases.items():
        probs = problems(raw)
        assert len(probs) == 1 and probs[0].startswith(f"r.yaml: stages.msd.{field}"), (field, probs)
    uncond = recipe({"k": 2})
    uncond["data"]["conditional"] = False
    assert any("class-conditional" in p and "stages.msd.students" in p for p in problems(uncond))
    smaller = parse_recipe(recipe({"k": 2, "size": "smaller"}, network=TINY, tsm={"train": {"steps": 2}}))
    assert smaller.groups["msd"] == ["msd_tsm_0", "msd_0", "msd_tsm_1", "msd_1", "msd"]
    assert smaller.stages["msd_1"].inputs == {"teacher": "teacher", "warm_start": "msd_tsm_1"}
    assert smaller.stages["msd_1"].method.init_from_teacher is False
    assert smaller.stages["msd_tsm_1"].method.name == "tsm" and smaller.stages["msd_tsm_1"].classes == [5, 6, 7, 8, 9]


# ----------------------------------------------------------------------------- the router

def _const_module() -> types.ModuleType:
    """A method whose model returns, for every input, the first parameter of its network."""
    mod = types.ModuleType("msd_const_for_tests")

    class Config(Strict):
        name: Literal["msd_const"] = "msd_const"

    class Const(Method):
        def __init__(self, cfg, ctx):
            super().__init__(cfg, ctx)
            self.add_net("net", ctx.network)

    def sample(model, z, nfe, class_labels=None):
        return torch.full_like(z, float(next(model.nets["net"].parameters()).flatten()[0]))

    mod.Config, mod.Method, mod.sample = Config, Const, sample
    return mod


@pytest.fixture()
def const_method():
    register_method(mod := _const_module())
    yield mod
    unregister_method("msd_const")


def _save(method, states, out: Path):
    """Save as a training stage does: the model, and its `resume` networks' live weights beside it."""
    out.mkdir(parents=True)
    save_model(out, method.cfg.name, method.cfg, method.net_cfgs, states, method.ctx.data.shape,
               method.ctx.data.num_classes, method.ctx.noise, method.meta())
    save_resume(out, {n: method.nets[n].state_dict() for n in method.resume})
    return load_model(out)


@pytest.mark.parametrize("groups", [None, [[3, 7, 1], [0, 9, 2], [4, 8, 6, 5]]])
def test_router_sends_each_class_to_its_student(const_method, tmp_path, groups):
    data, net = cached_data(DIGITS), NetworkConfig(**TINY)
    K = 3 if groups else 4
    students = []
    for k in range(K):
        m = const_method.Method(const_method.Config(), Context(data, EDM(), net))
        with torch.no_grad():
            next(m.nets["net"].parameters()).fill_(100.0 + k)          # student k returns 100 + k
        students.append(_save(m, {"net": m.nets["net"].state_dict()}, tmp_path / f"s{k}"))
    cfg = R.Config(classes=groups)
    router = get_method("router").Method(cfg, Context(data, EDM(), None, {"students": students}))
    model = _save(router, loop.train(router, TrainConfig(steps=0), None, progress=False), tmp_path / "router")
    assert model.meta["method"] == "router"
    owner_groups = groups or R.contiguous(10, K)
    assert [s["classes"] for s in model.meta["students"]] == owner_groups
    y = torch.randint(10, (500,), generator=torch.Generator().manual_seed(0))
    x = model.sample(torch.randn(500, *data.shape), 1, y)
    owner = {c: k for k, g in enumerate(owner_groups) for c in g}
    expected = torch.tensor([100.0 + owner[int(c)] for c in y])
    assert torch.equal(x.flatten(1)[:, 0], expected) and torch.equal(x.flatten(1).amax(1), x.flatten(1).amin(1))
    with pytest.raises(ValueError, match="class labels"):
        model.sample(torch.randn(4, *data.shape), 1, None)


# ----------------------------------------------------------------------------- the DAG

def test_dvc_yaml_has_the_k_student_stages_of_each_group():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for group, k, tsm in (("msd2", 2, False), ("msd4", 4, False), ("msd2s", 2, True), ("msd4s", 4, True)):
        mine = sorted(s for s in stages if s.startswith(f"digits_msd-{group}_"))
        want = [f"digits_msd-{group}_{i}" for i in range(k)] + ([f"digits_msd-{group}_tsm_{i}" for i in range(k)] if tsm else [])
        assert mine == sorted(want), (group, mine)
        router = stages[f"digits_msd-{group}"]
        assert [d for d in router["deps"] if d.startswith("outputs/")] == [
            f"outputs/digits_msd/{group}_{i}" for i in range(k)]
        assert "stages/students.py" in router["deps"] and "fastgen_core/methods/router.py" in router["deps"]
        for i in range(k):
            deps = stages[f"digits_msd-{group}_{i}"]["deps"]
            assert "outputs/digits_msd/teacher" in deps
            assert (f"outputs/digits_msd/{group}_tsm_{i}" in deps) == tsm
            assert stages[f"digits_msd-{group}_{i}"]["params"][0]["params/digits_msd.yaml"][-1] == f"stages.{group}"


@pytest.mark.xdist_group("recipe-digits_msd")  # the flow run tests/test_recipes.py makes (and caches)
def test_the_flow_runs_the_k_student_stages_before_their_router(prefect_harness, tmp_path_factory, mlflow_template):
    """params/digits_msd.yaml, shrunk, through the Prefect flow (tests/test_recipes.py's run), read back
    from Prefect's records of that flow run: one completed task run per stage; every student msd?_k
    waited on the teacher (and on its TSM stage msd?s_tsm_k) and started after they ended; every
    router waited on exactly its K students and started after the last of them ended; the evaluation
    came after the routers. The router's manifest names its K students, with their digests."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from test_recipes import flow_run

    from fastgen_core import artifacts
    from stages.recipe import load_recipe
    from stages.runtime import stage_dir

    _, p, results = flow_run(ROOT / "params" / "digits_msd.yaml", tmp_path_factory, mlflow_template)
    r = load_recipe(p)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["fastgen-recipe"]}),
                                     flow_run_filter=FlowRunFilter(name={"any_": [r.name]}))
        fr = min((f for f in runs if f.state.is_completed()), key=lambda f: f.start_time)  # the cached run
        tasks = {t.name: t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [fr.id]}))}
    assert sorted(tasks) == sorted(results) and all(t.state.is_completed() for t in tasks.values())
    name_of = {t.id: n for n, t in tasks.items()}

    def waited_on(stage: str) -> list[str]:  # the task runs this one's `wait_for` named
        return sorted(name_of[i.id] for i in tasks[stage].task_inputs.get("wait_for", []))

    def after(stage: str, ups: list[str]) -> None:
        assert all(tasks[u].end_time <= tasks[stage].start_time for u in ups), (stage, ups)

    expected = set()  # every stage of the four groups
    for group, k, tsm in (("msd2", 2, False), ("msd4", 4, False), ("msd2s", 2, True), ("msd4s", 4, True)):
        students = [f"{group}_{i}" for i in range(k)]
        expected |= {group, *students}
        for i, s in enumerate(students):
            ups = ["teacher"] + ([f"{group}_tsm_{i}"] if tsm else [])
            assert waited_on(s) == sorted(ups), s
            after(s, ups)
            if tsm:
                expected.add(f"{group}_tsm_{i}")
                assert waited_on(f"{group}_tsm_{i}") == ["teacher"]
                after(f"{group}_tsm_{i}", ["teacher"])
        assert waited_on(group) == students
        after(group, students)
        after("eval", [group])
        man = artifacts.read_manifest(stage_dir(r, group))
        assert {s: (v["role"], v["digest"]) for s, v in man["inputs"].items()} == {
            s: ("students", results[s]["digest"]) for s in students}
    assert {s for s in tasks if s.startswith("msd")} == expected and len(expected) == 22


# ----------------------------------------------------------------------------- a student's classes

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    data = cached_data(DIGITS)
    m = get_method("edm").Method(get_method("edm").Config(), Context(data, EDM(), NetworkConfig(**TINY)))
    out = tmp_path_factory.mktemp("msd") / "teacher"
    _save(m, loop.train(m, TrainConfig(steps=2, batch_size=8), None, progress=False), out)
    return out


def test_a_student_trains_only_on_its_classes_and_shares_the_pairs(teacher_dir):
    from stages.train import build_method

    data = cached_data(DIGITS)
    raw = recipe({"k": 4}, method={"name": "dmd", "reg_weight": 0.25})
    raw["stages"]["pairs"] = {"kind": "ode_pairs", "inputs": {"teacher": "teacher"}}
    raw["stages"]["msd"]["inputs"]["pairs"] = "pairs"
    r = parse_recipe(raw)
    pairs = {"noise": torch.randn(20, *data.shape), "sample": torch.randn(20, *data.shape),
             "label": torch.arange(20) % 10}
    import numpy as np

    pdir = teacher_dir.parent / "pairs"
    pdir.mkdir(exist_ok=True)
    np.savez(pdir / "pairs.npz", **{k: v.numpy() for k, v in pairs.items()})
    for k, group in enumerate(R.contiguous(10, 4)):
        m = build_method(r, f"msd_{k}", {"teacher": [str(teacher_dir)], "pairs": [str(pdir)]})
        keep = torch.isin(data.y, torch.tensor(group))
        assert torch.equal(m.ctx.data.x, data.x[keep]) and sorted(m.ctx.data.y.unique().tolist()) == group
        assert m.ctx.data.num_classes == 10                                # label embeddings keep their size
        assert torch.equal(m.tensors()["y"], pairs["label"])              # the pair set is not filtered
    r = parse_recipe(recipe({"k": 2}))
    m = build_method(r, "msd_1", {"teacher": [str(teacher_dir)]})
    y = m.tensors()["y"]                                                   # dmd2 draws batches from the data
    assert sorted(y.unique().tolist()) == [5, 6, 7, 8, 9] and len(y) == int((data.y >= 5).sum())


def test_warm_start_loads_the_tsm_network(teacher_dir, tmp_path):
    from stages.train import build_method

    data = cached_data(DIGITS)
    small = NetworkConfig(arch="mlp", width=8, depth=1, emb_dim=8)
    r = parse_recipe(recipe({"k": 2, "size": "smaller"}, network=small.model_dump(), tsm={"train": {"steps": 2}}))
    tsm = build_method(r, "msd_tsm_0", {"teacher": [str(teacher_dir)]})
    tsm_model = _save(tsm, loop.train(tsm, TrainConfig(steps=2, batch_size=8), None, progress=False), tmp_path / "tsm")
    m = build_method(r, "msd_0", {"teacher": [str(teacher_dir)], "warm_start": [str(tmp_path / "tsm")]})
    for k, v in tsm_model.nets["net"].state_dict().items():
        assert torch.equal(m.nets["net"].state_dict()[k], v)
    assert m.nets["critic"].state_dict().keys() == load_model(teacher_dir).nets["net"].state_dict().keys()
    assert sorted(m.ctx.data.y.unique().tolist()) == [0, 1, 2, 3, 4] and m.ctx.data.num_classes == len(data.y.unique())


def test_gan_phase_starts_each_student_from_its_dm_stage_with_the_gan_term(teacher_dir, tmp_path):
    """MSD's DM, then DM + GAN: msd_gan_k is the group's method with gan on (and the phase's
    changes), on group k's classes, its generator from msd_k's exported weights, its fake critic from
    msd_k's (live weights, as DMD2 resumes), its classifier head new; the router combines the DM + GAN
    students."""
    from stages.train import build_method

    r = parse_recipe(recipe({"k": 2}, method={"name": "dmd2", "ratio": 3},
                            gan={"method": {"gan_gen_weight": 1e-3}, "train": {"steps": 2}}))
    assert r.groups["msd"] == ["msd_0", "msd_gan_0", "msd_1", "msd_gan_1", "msd"]
    assert r.stages["msd"].inputs == {"students": ["msd_gan_0", "msd_gan_1"]}
    dm = build_method(r, "msd_0", {"teacher": [str(teacher_dir)]})
    dm_model = _save(dm, loop.train(dm, TrainConfig(steps=7, batch_size=8, lr=1e-2, ema_decay=0), None, progress=False),
                     tmp_path / "dm")
    m = build_method(r, "msd_gan_0", {"teacher": [str(teacher_dir)], "warm_start": [str(tmp_path / "dm")]})
    assert (dm.cfg.gan, m.cfg.gan, m.cfg.gan_gen_weight, m.cfg.ratio) == (False, True, 1e-3, 3)
    assert "head" in m.nets and "head" not in dm.nets
    teacher = load_model(teacher_dir).nets["net"].state_dict()
    for k, v in dm_model.nets["net"].state_dict().items():
        assert torch.equal(m.nets["net"].state_dict()[k], v)
        assert torch.equal(m.nets["critic"].state_dict()[k], dm.nets["critic"].state_dict()[k])
    assert any(not torch.equal(v, teacher[k]) for k, v in dm_model.nets["net"].state_dict().items())
    assert any(not torch.equal(v, teacher[k]) for k, v in dm.nets["critic"].state_dict().items())
    assert sorted(m.ctx.data.y.unique().tolist()) == [0, 1, 2, 3, 4]
    assert problems(recipe({"k": 2}, method={"name": "cd"}, gan={})) == [
        "r.yaml: stages.msd.gan: a DM + GAN phase needs a student method with a GAN term that can start from "
        "other weights than the teacher's (settings gan, init_from_teacher); 'cd' has not"]


# ----------------------------------------------------------------------------- TSM

def test_tsm_moves_a_small_network_towards_the_teacher_denoiser(teacher_dir):
    """L_TSM = E λ(σ)‖D_θ(x + σn, σ) − D_teacher(x + σn, σ)‖²: trained, the student's denoiser is
    closer to the teacher's on noised held-out data than at its random start."""
    data, noise = cached_data(DIGITS), EDM()
    teacher = load_model(teacher_dir)
    with torch.no_grad():  # a teacher far from the student's start (a fresh network's output layer is zero)
        torch.manual_seed(3)
        for p in teacher.nets["net"].parameters():
            p.copy_(0.2 * torch.randn_like(p))
    tsm = get_method("tsm")
    m = tsm.Method(tsm.Config(), Context(data, noise, NetworkConfig(arch="mlp", width=32, depth=1, emb_dim=16),
                                         {"teacher": teacher}))
    g = torch.Generator().manual_seed(1)
    x0, y = data.x_test[:256], data.y_test[:256]
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(256, generator=g))
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g)

    def gap():
        with torch.no_grad():
            d = (m.D(x, sigma, class_labels=y) - teacher.denoiser()(x, sigma, class_labels=y)) ** 2
        return float((noise.loss_weight(sigma) * d.flatten(1).mean(1)).mean())

    before = gap()
    torch.manual_seed(0)
    loop.train(m, TrainConfig(steps=150, batch_size=64, lr=3e-3, ema_decay=0.0), None, progress=False)
    assert gap() < 0.5 * before, (before, gap())
