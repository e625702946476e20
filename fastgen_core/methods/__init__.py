"""Methods: one module per paper family.

A method module defines
- `Config`  — a pydantic model of its settings, with `name: Literal["<module name>"]`;
- `Method`  — a `base.Method` subclass: its networks, optimiser groups and losses for the one loop;
- `sample(model, z, nfe, class_labels=None)` — how a trained model of this method generates.
Adding a method is adding a module here (plus tests and a recipe); it is found by its file name.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

_NOT_METHODS = {"base"}


@cache
def available_methods() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_METHODS))


def get_method(name: str) -> ModuleType:
    if name not in available_methods():
        raise KeyError(f"unknown method {name!r} (known: {', '.join(available_methods())})")
    return importlib.import_module(f"{__name__}.{name}")
