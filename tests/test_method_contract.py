"""The method contract (fastgen_core/methods/base.py), checked for every registered method: the
registry and the config union, declared input roles, building from inputs made from those roles,
three loop steps, save and load, sampling at NFE 1 and 2, and the boundary condition of a
consistency function. The parametrisation is read from the registry when the tests are collected,
so a newly added or registered method is covered without touching this file; a dummy method
registered here shows that (`test_the_dummy_method_is_covered`)."""
from __future__ import annotations

import contextlib
import types
from typing import Literal

import pytest
import torch
from pydantic import Field, TypeAdapter, ValidationError

from fastgen_core import loop
from fastgen_core.config import DataConfig, NetworkConfig, Strict, TrainConfig
from fastgen_core.data import load_data
from fastgen_core.methods import (available_methods, config_union, get_method, method_configs, register_method,
                                  unregister_method)
from fastgen_core.methods.base import Context, Method, Role
from fastgen_core.methods.common import col, condition, network_settings
from fastgen_core.models import load_model, save_model
from fastgen_core.noise import EDM, PROCESSES, EDMDenoiser
from fastgen_core.samplers import edm_sample, teacher_sample
from stages.evaluate import _generate

torch.set_default_dtype(torch.float32)
NET = NetworkConfig(arch="mlp", width=16, depth=1, emb_dim=8)
TRAIN = TrainConfig(steps=3, batch_size=16, lr=1e-3, ema_decay=0.9)


# ----------------------------------------------------------------------------- a dummy method

def _dummy_module() -> types.ModuleType:
    """A method module made at run time: a one-step regression of ODE pairs (or of the teacher's
    denoiser at σ_max when no pairs are given), sampled with the Euler/Heun teacher sampler."""
    mod = types.ModuleType("dummy_method_for_tests")

    class Config(Strict):
        name: Literal["dummy"] = "dummy"
        scale: float = Field(1.0, gt=0, description="loss scale")

    class DummyMethod(Method):
        roles = {"teacher": Role("model", method="edm", description="an EDM model"),
                 "pairs": Role("pairs", required=False, description="ODE pairs of the teacher")}

        def __init__(self, cfg, ctx):
            super().__init__(cfg, ctx)
            teacher = ctx.inputs["teacher"]
            self.add_net("net", network_settings(ctx, teacher), init_from=teacher.nets["net"])
            self.D = EDMDenoiser(self.nets["net"], ctx.noise)
            self.D_teacher = teacher.denoiser()

        def tensors(self):
            pairs = self.ctx.inputs.get("pairs")
            if pairs is None:
                return super().tensors()
            out = {"z": pairs["noise"], "x": pairs["sample"]}
            return out if (pairs["label"] < 0).all() else {**out, "y": pairs["label"]}

        def loss(self, group, batch, step):
            x, cond = batch["x"], condition(self.labels(batch))
            T = self.ctx.noise.sigma_max
            z = batch["z"] if "z" in batch else torch.randn_like(x)
            target = x if "z" in batch else self.D_teacher(x + T * z, T, **cond).detach()
            return self.cfg.scale * ((self.D(T * z, T, **cond) - target) ** 2).mean(), {}

    def sample(model, z, nfe, class_labels=None):
        return teacher_sample(model.denoiser(), z, model.noise, nfe, **condition(class_labels))

    mod.Config, mod.Method, mod.sample = Config, DummyMethod, sample
    return mod


DUMMY = _dummy_module()
register_method(DUMMY)
try:
    METHODS = available_methods()
finally:
    unregister_method("dummy")


@pytest.fixture(scope="module", autouse=True)
def _dummy_registered():
    register_method(DUMMY)
    yield
    unregister_method("dummy")


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(kind="toy", name="labelled_mixture", n_train=256, n_test=64, conditional=True))


# ----------------------------------------------------------------------------- inputs from roles

class Inputs:
    """Trained input models (built recursively from each method's required roles, 3 loop steps,
    saved and loaded) and ODE pair sets, made once per module."""

    def __init__(self, data, root):
        self.data, self.root, self.models, self.pairs_set = data, root, {}, None

    def model(self, method: str):
        if method not in self.models:
            mod = get_method(method)
            cfg = mod.Config()
            m = mod.Method(cfg, self.context(self.for_roles(mod.Method, mod.Method.required_roles(cfg)), mod.Method))
            self.models[method] = save_and_load(m, loop.train(m, TRAIN, None, progress=False), self.root / method)
        return self.models[method]

    def pairs(self) -> dict:
        if self.pairs_set is None:
            teacher, g = self.model("edm"), torch.Generator().manual_seed(0)
            z = torch.randn((32, *self.data.shape), generator=g)
            y = self.data.y[torch.randint(len(self.data.y), (32,), generator=g)]
            x = edm_sample(teacher.denoiser(), z, teacher.noise, 4, "heun", class_labels=y)
            self.pairs_set = {"noise": z, "sample": x, "label": y}
        return self.pairs_set

    def one(self, role: Role):
        if role.kind == "pairs":
            return self.pairs()
        model = self.model(role.method or "edm")
        return [model, model] if role.kind == "models" else model

    def for_roles(self, method_cls, names) -> dict:
        return {name: self.one(method_cls.roles[name]) for name in sorted(names)}

    def context(self, inputs: dict, method=None) -> Context:
        """The method's first noise process (`Method.processes`; EDM when no method is named)."""
        noise = PROCESSES[method.processes[0]]() if method is not None else EDM()
        return Context(self.data, noise, NET, inputs, steps=TRAIN.steps)


def save_and_load(method, states, out):
    out.mkdir(parents=True)
    save_model(out, method.cfg.name, method.cfg, method.net_cfgs, states, method.ctx.data.shape,
               method.ctx.data.num_classes, method.ctx.noise, method.meta())
    return load_model(out)


@pytest.fixture(scope="module")
def inputs(data, tmp_path_factory):
    return Inputs(data, tmp_path_factory.mktemp("contract"))


# ----------------------------------------------------------------------------- the tests

def test_the_dummy_method_is_covered():
    assert "dummy" in METHODS and set(METHODS) > {"dummy"}
    assert get_method("dummy") is DUMMY and method_configs()["dummy"] is DUMMY.Config
    with pytest.raises(ValueError, match="already exists"):
        register_method(get_method("cd"))


def test_unknown_method_and_config_union():
    with pytest.raises(KeyError, match="unknown method 'magic'"):
        get_method("magic")
    union = TypeAdapter(config_union())
    with pytest.raises(ValidationError, match="magic"):
        union.validate_python({"name": "magic"})
    with pytest.raises(ValidationError):
        union.validate_python({"name": "cd", "no_such_setting": 1})


def test_a_package_method_is_named_after_its_file(monkeypatch):
    """A module of fastgen_core/methods/ whose Config names another method is one clear error
    naming the file (it used to surface as "unknown method" while listing it as known)."""
    import sys

    from fastgen_core import methods

    module = types.ModuleType("fastgen_core.methods.zz_misnamed")
    module.Config, module.Method, module.sample = get_method("cd").Config, get_method("cd").Method, get_method("cd").sample
    monkeypatch.setitem(sys.modules, module.__name__, module)
    names = (*methods._package_methods(), "zz_misnamed")
    monkeypatch.setattr(methods, "_package_methods", lambda: names)
    with pytest.raises(TypeError, match=r"methods/zz_misnamed.py: its Config must declare "
                                        r"name: Literal\['zz_misnamed'\] = 'zz_misnamed'.*not 'cd'"):
        get_method("zz_misnamed")


@pytest.mark.parametrize("name", METHODS)
def test_module_declares_the_contract(name):
    mod = get_method(name)
    cfg = mod.Config()
    assert cfg.name == name and issubclass(mod.Method, Method) and callable(mod.sample)
    again = TypeAdapter(config_union()).validate_python(cfg.model_dump(mode="json"))
    assert type(again) is mod.Config and again == cfg                     # one union, told apart by name
    assert all(isinstance(r, Role) and r.kind in ("model", "models", "pairs") for r in mod.Method.roles.values())
    assert all(r.method is None or r.method in available_methods() for r in mod.Method.roles.values())
    assert mod.Method.required_roles(cfg) <= set(mod.Method.roles)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_checked_against_the_roles(name, inputs):
    mod = get_method(name)
    cfg, roles = mod.Config(), mod.Method.roles
    required = mod.Method.required_roles(cfg)
    mod.Method(cfg, inputs.context(inputs.for_roles(mod.Method, required), mod.Method))   # the required roles suffice
    for missing in required:
        given = inputs.for_roles(mod.Method, required - {missing})
        with pytest.raises(ValueError, match=f"needs input '{missing}'"):
            mod.Method(cfg, inputs.context(given, mod.Method))
    extra = {**inputs.for_roles(mod.Method, required), "no_such_role": inputs.model("edm")}
    assert any("takes no input 'no_such_role'" in p for p in mod.Method.input_problems(cfg, extra))
    mod.Method(cfg, inputs.context(extra, mod.Method))        # built anyway: inputs of other roles are ignored
    for role in [r for r in roles if roles[r].method]:
        wrong = "classifier" if roles[role].method != "classifier" else "edm"
        probs = mod.Method.input_problems(cfg, {role: inputs.one(Role(roles[role].kind, method=wrong))})
        assert any(f"trained with method {roles[role].method!r}" in p for p in probs), probs


# samplers that read sample values on the host on purpose, once per call: Analog Bits seeds each
# row's bit noise from the row's bytes; the router refuses a class that belongs to no student
READS_ON_PURPOSE = {"bits", "router"}


def _samples_on_meta(model, z, y, nfe, monkeypatch):
    """Sample with the networks, z and labels on PyTorch's `meta` device (shapes, no data): a tensor
    made on the CPU and combined with them raises "not on the expected device" as it would on a
    GPU, and reading a value on the host (bool, item, ...) raises too."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k:  # no autocast for meta
                        contextlib.nullcontext() if device_type == "meta" else real(device_type, *a, **k))
    model.nets.to("meta")
    return model.sample(z.to("meta"), nfe, class_labels=y.to("meta"))


@pytest.mark.parametrize("name", METHODS)
def test_train_save_load_sample(name, inputs, data, tmp_path, monkeypatch):
    mod = get_method(name)
    cfg = mod.Config()
    m = mod.Method(cfg, inputs.context(inputs.for_roles(mod.Method, mod.Method.roles), mod.Method))   # every declared role
    states = loop.train(m, TRAIN, None, progress=False)
    assert set(states) == set(m.export) and all(torch.isfinite(p).all() for p in m.nets.parameters())
    model = save_and_load(m, states, tmp_path / name)
    assert model.meta["method"] == name and model.cfg == cfg and model.method is mod
    for n, sd in states.items():
        assert all(torch.equal(v, model.nets[n].state_dict()[k]) for k, v in sd.items())
    if not mod.Method.generates:
        return
    z, y = torch.randn(32, *data.shape), data.y[:32]
    out = {}
    for nfe in (1, 2):
        torch.manual_seed(0)
        out[nfe] = model.sample(z, nfe, class_labels=y)
        assert out[nfe].shape == z.shape and torch.isfinite(out[nfe]).all(), nfe
    assert not torch.equal(out[1], out[2])                                  # the budget is used
    # the evaluate stage's sample_batch: a deterministic sampler gives the same samples 7 at a time as
    # in one batch of 32 (nothing couples the samples of a batch); a stochastic one the same shape
    labels = {0: data.y[:32]}
    for nfe in (1, 2):
        whole = _generate(model, 32, nfe, 0, labels, "cpu")
        torch.manual_seed(1)
        deterministic = torch.equal(model.sample(z, nfe, class_labels=y),
                                    (torch.manual_seed(2), model.sample(z, nfe, class_labels=y))[1])
        chunked = _generate(model, 32, nfe, 0, labels, "cpu", batch=7)
        assert chunked.shape == whole.shape and torch.isfinite(chunked).all(), nfe
        if deterministic:
            assert torch.allclose(chunked, whole, rtol=1e-4, atol=1e-5), (name, nfe, (chunked - whole).abs().max())
    if hasattr(mod, "consistency_fn"):                                      # boundary: f(x, σ_min) = x
        f, eps = mod.consistency_fn(model), model.noise.sigma_min
        x = 2 * torch.randn(64, *data.shape)
        err = (f(x, torch.full((64,), eps), **condition(data.y[:64])) - x).abs() / (1 + x.abs())
        assert err.max() <= 5 * eps, (name, err.max().item())               # exactly 0 for cd, ct, ctm
        far = (f(x, torch.full((64,), 1.0), **condition(data.y[:64])) - x).abs() / (1 + x.abs())
        assert far.max() > 10 * err.max()                                   # and f is not the identity
    # last (it moves the networks): sampling on another device than the CPU mixes no CPU tensor in and,
    # but where a sampler must, reads nothing back (a GPU would wait on it)
    try:
        out = _samples_on_meta(model, z, y, 2, monkeypatch)
        assert out.device.type == "meta" and out.shape == z.shape
    except (RuntimeError, NotImplementedError) as e:
        if "expected device" in str(e) or name not in READS_ON_PURPOSE:
            raise
