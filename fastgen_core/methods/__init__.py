"""Methods: one module per paper family, and their registry.

A method module defines `Config`, `Method` and `sample` (the contract: `methods.base`). The modules
of this package are found by their file name (`common` and `base` are shared pieces, not methods);
`register_method(module)` adds one at run time (a plugin, or a test's dummy method).
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache, lru_cache
from types import ModuleType
from typing import Annotated, Any, Union

from pydantic import Field

_NOT_METHODS = {"base", "common"}
_registered: dict[str, ModuleType] = {}


@cache
def _package_methods() -> tuple[str, ...]:
    return tuple(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_METHODS)


def available_methods() -> tuple[str, ...]:
    """Names of every method: this package's modules and the registered ones, sorted."""
    return tuple(sorted({*_package_methods(), *_registered}))


def get_method(name: str) -> ModuleType:
    """The module of method `name`."""
    if name in _registered:
        return _registered[name]
    if name not in _package_methods():
        raise KeyError(f"unknown method {name!r} (known: {', '.join(available_methods())})")
    module = importlib.import_module(f"{__name__}.{name}")
    field = getattr(getattr(module, "Config", None), "model_fields", {}).get("name")
    if field is None or field.default != name:  # the recipe's `method.name` is the file's name
        raise TypeError(f"fastgen_core/methods/{name}.py: its Config must declare name: Literal[{name!r}] = {name!r} "
                        f"(a method is named after its file), not {getattr(field, 'default', None)!r}")
    return module


def register_method(module: ModuleType) -> str:
    """Add a method module (with `Config`, `Method`, `sample`; see `methods.base`) under the name
    its Config declares; returns that name. Registering the same module again is a no-op."""
    from .base import Method

    config, method = getattr(module, "Config", None), getattr(module, "Method", None)
    name = getattr(config, "model_fields", {}).get("name")
    name = None if name is None else name.default
    if not isinstance(name, str) or not (isinstance(method, type) and issubclass(method, Method)) \
            or not callable(getattr(module, "sample", None)):
        raise TypeError(f"{module.__name__}: a method module needs `Config` (with a default `name`), "
                        "a `Method` subclass of methods.base.Method and `sample`")
    if name in _package_methods() or _registered.get(name, module) is not module:
        raise ValueError(f"a method named {name!r} already exists")
    _registered[name] = module
    return name


def unregister_method(name: str) -> None:
    """Remove a method added by `register_method` (the package's own modules stay)."""
    _registered.pop(name, None)


def method_configs() -> dict[str, type]:
    """Method name -> its `Config` class, for every available method."""
    return {name: get_method(name).Config for name in available_methods()}


def config_union() -> Any:
    """The pydantic type of a stage's `method`: the union of every method's Config, told apart by
    `name` (`Annotated[Union[...], Field(discriminator="name")]`). Built from the methods available
    now: a method registered later needs a new call."""
    return _union(tuple(method_configs().items()))


@lru_cache(maxsize=8)
def _union(configs: tuple[tuple[str, type], ...]) -> Any:
    classes = tuple(c for _, c in configs)
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007
