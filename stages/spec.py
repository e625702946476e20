"""What every stage kind's settings share, and the checks that need the whole recipe.

Each stage module (`stages/train.py`, `stages/ode_pairs.py`, …) declares its settings as a `Spec`,
a subclass of `StageSpec` with `kind: Literal[...]` naming the kind(s) it runs and only the fields
that kind uses. `stages/recipe.py` puts the modules' Specs into one union keyed by `kind`, so a
recipe stage carries its own kind's settings and nothing else, and a stage's params digest covers
exactly those settings (docs/recipes.md).
"""
from __future__ import annotations


from pydantic import Field

from fastgen_core.config import DataConfig, NetworkConfig, Strict
from fastgen_core.methods import config_union

Problem = tuple[str, str]  # (field path from the recipe root, message)


class StageError(Exception):
    """A stage that cannot run with what it was given (one line, shown without a traceback)."""


class StageSpec(Strict):
    """Base of every stage kind's settings."""

    kind: str
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="role -> name(s) of the stage(s) whose outputs this stage consumes")

    def problems(self, recipe, name: str) -> list[Problem]:
        """Checks that need the rest of the recipe (inputs' kinds, data); none by default."""
        return []

    def model_method(self, recipe, seen: tuple = ()) -> str | None:
        """The method this stage's saved model samples with (None: the stage makes no model)."""
        return None

    def expand(self, name: str, recipe) -> dict[str, StageSpec] | None:
        """The stages this declaration stands for (None: just itself). A group kind (K students,
        R rounds) returns an ordered mapping of concrete stage Specs of other kinds; the last is named
        `name` (the group's output, what other stages' inputs naming `name` receive), the others
        `{name}_<suffix>`. `stages.recipe.parse_recipe` expands once, after the structure is
        validated and before the graph checks; members are ordinary stages from then on."""
        return None


# A stage's `method`: the union of every registered method's `Config`, told apart by `name`
# (validated once, at recipe load).
MethodConfig = config_union()


def stage_names(value: str | list[str]) -> list[str]:
    """The stage names of one input role (a name, or a list of names)."""
    return [value] if isinstance(value, str) else list(value)


def one_input(spec: StageSpec, role: str) -> str | None:
    """The stage named by a single-valued input role (None when absent or a list)."""
    v = spec.inputs.get(role)
    return v if isinstance(v, str) else None


def sample_shape(data: DataConfig) -> tuple[int | None, ...]:
    """The shape of one sample of `data` as far as its settings tell (None: known only once
    loaded): toy (2,), digits (C, 8, 8), images (C, H, W) with H = W = `resolution`."""
    if data.kind == "toy":
        return (2,)
    if data.kind == "digits":
        return (3 if data.color else 1, 8, 8)
    return (data.channels, data.resolution, data.resolution)


def network_problems(net: NetworkConfig, data: DataConfig, at: str) -> list[Problem]:
    """A network that could not be built for `data` (`fastgen_core.nets.build_network`): a U-Net
    for vectors, or one whose levels do not divide the image side; the classifier architecture,
    which only the classifier method builds (from its own `width`)."""
    if net.arch == "classifier":
        return [(f"{at}.arch", "classifier is the feature network's architecture, built by method classifier "
                 "from its width: use mlp or unet")]
    if net.arch != "unet":
        return []
    side = sample_shape(data)[-1]
    if data.kind == "toy":
        return [(f"{at}.arch", "unet needs image data (data.kind digits or images), not toy: use mlp")]
    factor = 2 ** (len(net.channel_mult) - 1)
    if side is not None and side % factor:
        return [(f"{at}.channel_mult", f"{len(net.channel_mult)} levels halve the image {len(net.channel_mult) - 1} "
                 f"times, which needs a side divisible by {factor}, not {side}")]
    if side is not None and net.attn_resolutions:
        sides = [side // 2**i for i in range(len(net.channel_mult))]
        missing = sorted(set(net.attn_resolutions) - set(sides))
        if missing:
            return [(f"{at}.attn_resolutions", f"{missing} are not feature-map sides of this network "
                     f"at {side} pixels (sides {sides})")]
    return []
