"""What every stage kind's settings share, and the checks that need the whole recipe.

Each stage module (`stages/train.py`, `stages/ode_pairs.py`, …) declares its settings as a `Spec`,
a subclass of `StageSpec` with `kind: Literal[...]` naming the kind(s) it runs and only the fields
that kind uses. `stages/recipe.py` puts the modules' Specs into one union keyed by `kind`, so a
recipe stage carries its own kind's settings and nothing else, and a stage's params digest covers
exactly those settings (docs/recipes.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from fastgen_core.config import Strict
from fastgen_core.methods import config_union

if TYPE_CHECKING:
    from .recipe import Recipe

Problem = tuple[str, str]  # (field path from the recipe root, message)


class StageError(Exception):
    """A stage that cannot run with what it was given (one line, shown without a traceback)."""


class StageSpec(Strict):
    """Base of every stage kind's settings."""

    kind: str
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="role -> name(s) of the stage(s) whose outputs this stage consumes")

    def problems(self, recipe: "Recipe", name: str) -> list[Problem]:
        """Checks that need the rest of the recipe (inputs' kinds, data); none by default."""
        return []

    def model_method(self, recipe: "Recipe", seen: tuple = ()) -> str | None:
        """The method this stage's saved model samples with (None: the stage makes no model)."""
        return None


# A stage's `method`: the union of every registered method's `Config`, told apart by `name`
# (validated once, at recipe load).
MethodConfig = config_union()


def one_input(spec: StageSpec, role: str) -> str | None:
    """The stage named by a single-valued input role (None when absent or a list)."""
    v = spec.inputs.get(role)
    return v if isinstance(v, str) else None
