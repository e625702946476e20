"""The method contract: what a method module gives the one training loop (`fastgen_core.loop.train`),
the recipe and the samplers.

A method module `fastgen_core/methods/<name>.py` (or one added with `methods.register_method`) defines

- `Config`  — a pydantic model (`config.Strict`) of its settings with `name: Literal["<name>"]`;
              `methods.config_union()` joins every Config into one union told apart by `name`, so a
              stage's `method` is validated once, when the recipe is loaded;
- `Method`  — a subclass of `Method` below: its networks, optimiser groups and losses;
- `sample(model, z, nfe, class_labels=None)` — how a trained model (`models.LoadedModel`) of this
              method generates from standard-normal z with `nfe` network evaluations;
- optionally `consistency_fn(model)` — f(x, σ, **cond) -> x0 in the EDM convention (x = x0 + σ·n)
              for the consistency-type families (editing, docs/methods.md §1); at the data end
              σ = σ_min it returns x (exactly for CD/CT/CTM; up to O(σ_min) where the family's own
              boundary is σ = 0, sCM and AYF).
- optionally, for methods whose `sample` is a deterministic noise → data map (flows: rectified
  flow §13, CAF §2), read by the evaluation's map metrics (`stages/evaluate.py`):
  `trajectory(model, z, nfe, class_labels=None)` — the sampled path from standard-normal z, a
              Tensor (nfe + 1, n, ...) of states from noise (index 0, = z up to the sampler's own input
              scaling) to its sample (index nfe, = `sample(model, z, nfe)`), which the straightness
              (`metrics.straightness`) treats as equally spaced in time (RF: its Euler steps; CAF:
              the times where κ(t_i) = i/N); also the 2D path plots;
  `invert(model, x, nfe, class_labels=None) -> z` — data → standard-normal noise with the same
              nfe steps run backwards, so that `sample(model, invert(model, x, k), k) ≈ x`
              (inversion error).

The hard cases it has to take without special cases in the loop: several networks per method
(student, target, fake critic, discriminator, K students), several optimisers at different rates
(DMD2's 5:1), a second time argument, JVPs, extra conditions, a frozen teacher in another time
convention, progressive rounds. The answer:

- `self.nets`   — an `nn.ModuleDict` of every network the method owns and saves (trainable or not).
- `groups()`    — optimiser groups: a name, the parameters it steps, how often (`every`), lr scale.
                  The loop steps group g on iterations where `g.due(step)` (`step % g.every == 0`,
                  less multiples of `g.skip_every` when set: exclusive alternation), calling
                  `loss(g.name, batch, step)` for each; gradients of one group never leak into
                  another's step because each group zeroes and steps only its own parameters.
- `tensors()`   — the training tensors the loop draws minibatches from (data, or ODE pairs).
- `after_step`  — per-iteration bookkeeping (target-network EMA, schedules).
- `export`      — the networks saved as the model (their evaluation-EMA weights).
- `resume`      — networks saved beside the model with their live training weights
                  (`resume.safetensors`), which a stage warm-started from it loads into its own
                  networks of those names (DMD2's fake critic and GAN head, docs/methods.md §5).
- `meta()`      — extra facts saved in model.json.

Inputs. A method declares the inputs it takes in `roles` (role -> `Role`: one model, several
models, or an ODE pair set; required or not; the method the input model must have been trained
with). Where requiredness depends on the settings, `required_roles(cfg)` says which are needed.
`settings_problems(cfg, train)` names settings the method cannot run with given the stage's `train`
settings (e.g. ct's K defaulting to train.steps = 0); recipe validation reports them.
Recipe validation reads both (one line per missing or unknown input, `input_problems`);
`Method.__init__` checks the inputs of its declared roles the same way and ignores inputs of
other roles (a `weak_snapshot` guide's `teacher` only names what it imitates). Inputs arrive in
`ctx.inputs` as loaded models (`LoadedModel`), lists of them (kind "models") or pair sets (dicts
of tensors). A frozen teacher in another time convention is wrapped once by `noise.denoiser_in`.
Progressive rounds are separate stages: a round's student is the next round's `teacher` input.

A method is built as `Method(cfg, ctx)` from its Config and a `Context`: the data, the noise
process, the stage's `network` settings (None: the teacher's), the inputs, the device, the seed and
`steps`, the stage's train.steps (schedules that span the run, e.g. ct's K, default to it).

`processes` names the noise processes (`Context.noise`) the method trains in; `generates` is False
for a method whose models do not generate (the classifier: its `sample` raises TypeError).
The pieces several methods share are in `methods.common`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from torch import nn

RoleKind = Literal["model", "models", "pairs"]


@dataclass(frozen=True)
class Role:
    """One input a method takes: `kind` "model" (one model), "models" (a list of models) or "pairs"
    (an ODE pair set); `method`: the method the input model must have been trained with (None: any);
    `unconditional`: the input model must have an unconditional mode (trained with label_dropout > 0)."""

    kind: RoleKind = "model"
    required: bool = True
    method: str | None = None
    description: str = ""
    unconditional: bool = False


@dataclass
class Group:
    """One optimiser: the parameters it owns, how often it steps and its learning-rate scale.
    It steps on iterations where `step % every == 0`, except, when `skip_every` > 0, those where
    `step % skip_every == 0` (e.g. a critic that yields every k-th iteration to its generator:
    exclusive alternation, `every=1, skip_every=k`, against a generator with `every=k`)."""

    name: str
    params: list[nn.Parameter]
    every: int = 1
    lr_scale: float = 1.0
    skip_every: int = 0

    def due(self, step: int) -> bool:
        """Whether this group steps at iteration `step` (0-based)."""
        return step % self.every == 0 and not (self.skip_every > 0 and step % self.skip_every == 0)


@dataclass
class Context:
    """What a method is built from: the data, the noise process, its network settings, its inputs."""

    data: Any                      # fastgen_core.data.Dataset
    noise: Any                     # the noise process (fastgen_core.noise; the method's `processes`)
    network: Any = None            # NetworkConfig of the trained network (None: copy the teacher's)
    inputs: dict[str, Any] = field(default_factory=dict)  # role -> LoadedModel | [LoadedModel] | pairs dict
    device: torch.device = torch.device("cpu")
    seed: int = 0
    steps: int = 0                 # the stage's train.steps (schedules that span the run default to it)


def _method_of(model) -> str | None:
    """The method a loaded input model was trained with (None when not known, e.g. a pair set)."""
    meta = getattr(model, "meta", None)
    return meta.get("method") if isinstance(meta, dict) else None


class Method:
    """Base class; see the module docstring."""

    export: tuple[str, ...] = ("net",)
    resume: tuple[str, ...] = ()
    roles: ClassVar[dict[str, Role]] = {}
    processes: ClassVar[tuple[str, ...]] = ("edm",)
    generates: ClassVar[bool] = True  # False: its models do not sample (e.g. the classifier)

    @classmethod
    def required_roles(cls, cfg) -> set[str]:
        """The roles this configuration needs (default: those declared required)."""
        return {name for name, role in cls.roles.items() if role.required}

    @classmethod
    def settings_problems(cls, cfg, train) -> list[tuple[str, str]]:
        """(field path from the stage, message) for settings this method cannot run with, given the
        stage's `train` settings (`config.TrainConfig`); none by default. Recipe validation calls it."""
        return []

    @classmethod
    def input_problems(cls, cfg, inputs: Mapping[str, Any],
                       method_of: Callable[[Any], str | None] = _method_of) -> list[str]:
        """One line per problem of `inputs` (role -> input, or a list of them for kind "models"):
        an unknown role, a list where one input is taken (or the reverse), an input model trained
        with another method than the role names (as told by `method_of`), a missing required role."""
        name, probs = getattr(cfg, "name", cls.__module__.rsplit(".", 1)[-1]), []
        for role, given in inputs.items():
            want = cls.roles.get(role)
            if want is None:
                probs.append(f"{role}: method {name!r} takes no input {role!r} (it takes: {', '.join(cls.roles) or 'none'})")
                continue
            if isinstance(given, (list, tuple)) != (want.kind == "models"):
                probs.append(f"{role}: method {name!r} takes " + ("a list of models" if want.kind == "models" else "one input"))
                continue
            for one in given if want.kind == "models" else [given]:
                made = method_of(one) if want.method else None
                if made is not None and made != want.method:
                    probs.append(f"{role}: needs a model trained with method {want.method!r}, got {made!r}")
        for role in sorted(cls.required_roles(cfg) - set(inputs)):
            probs.append(f"{role}: method {name!r} needs input {role!r} ({cls.roles[role].description or cls.roles[role].kind})")
        return probs

    def __init__(self, cfg, ctx: Context):
        probs = self.input_problems(cfg, {r: v for r, v in ctx.inputs.items() if r in self.roles})
        if probs:
            raise ValueError("inputs: " + "; ".join(probs))
        self.cfg, self.ctx = cfg, ctx
        self.nets = nn.ModuleDict()
        self.net_cfgs: dict[str, Any] = {}

    def add_net(self, name: str, net_cfg, init_from: nn.Module | None = None) -> nn.Module:
        """Build network `name` from its NetworkConfig (optionally copying weights) and own it."""
        from ..nets import build_network

        net = build_network(net_cfg, self.ctx.data.shape, self.ctx.data.num_classes).to(self.ctx.device)
        if init_from is not None:
            net.load_state_dict(init_from.state_dict())
        self.nets[name], self.net_cfgs[name] = net, net_cfg
        return net

    # --- what the loop calls -------------------------------------------------------------
    def groups(self) -> list[Group]:
        return [Group("net", list(self.nets["net"].parameters()))]

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"x": self.ctx.data.x}
        if self.ctx.data.y is not None and self.ctx.data.num_classes > 0:
            d["y"] = self.ctx.data.y
        return d

    def loss(self, group: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        """(scalar loss of `group`, logs). Log values are numbers or 0-d tensors; return tensors
        (`x.detach()`, not `x.item()`): the loop reads them from the device once per log step, and
        `.item()` here would make every step wait for the GPU."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        pass

    # --- helpers for subclasses ----------------------------------------------------------
    def labels(self, batch: dict) -> torch.Tensor | None:
        """Class labels of a batch, or None for unconditional data."""
        return batch.get("y")

    def meta(self) -> dict:
        """Extra facts saved in model.json (besides method, config, networks, shape, noise)."""
        return {}
