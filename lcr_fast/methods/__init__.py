"""The registry of self-supervised methods that carry the LCR branch: one line per method.

Each name below is a module of this package that declares ``METHOD``, a ``lcr_fast.methods.base.Method``:
its model class (imported only when a model is built), augmentation recipe, ``model.*`` config keys
with their defaults, optimizer groups, reference checkpoint layout, end-of-run evaluation, default linear
protocol and batch constraint. The rest of the code asks ``get(cfg.model.name)`` for these and never
compares a method's name itself. Declarations import no torch, so ``lcr_fast.config`` assembles its
defaults from them at import without a cycle through ``lcr_fast.models`` (which reads the config).

Adding a method: a declaration module here, its model (an ``lcr_fast.models.lcr.LCRModel``), its
configs, and its name in ``NAMES``.
"""
from __future__ import annotations

import importlib

from .base import Method

NAMES = ("byol", "moco", "simsiam")

_METHODS: dict[str, Method] = {name: importlib.import_module(f"{__name__}.{name}").METHOD for name in NAMES}
for _name, _method in _METHODS.items():
    if _method.name != _name:
        raise ValueError(f"lcr_fast.methods.{_name} declares a method called {_method.name!r}")


def names() -> tuple[str, ...]:
    return NAMES


def get(name: str) -> Method:
    """The method called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {NAMES}") from None


def with_reference_layout() -> tuple[str, ...]:
    """The methods whose reference implementation's checkpoints lcr_fast.compat reads and writes."""
    return tuple(name for name in NAMES if _METHODS[name].reference is not None)


def of_model(model: object) -> Method:
    """The method whose model class ``model`` is an instance of (imports the model classes)."""
    for method in _METHODS.values():
        if isinstance(model, method.model_class()):
            return method
    raise ValueError(f"{type(model).__name__} is not the model of any registered method ({', '.join(NAMES)})")
