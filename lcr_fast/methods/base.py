"""What a self-supervised method declares to carry the LCR branch: the ``Method`` record.

The record is plain data and functions of plain data (config sections, state-dict shapes): this module
and the methods' declaration modules import no torch, so ``lcr_fast.config`` can read them while it
assembles its defaults, and the models package (which reads the config module) is only imported when a
model is built. What the model itself must offer is stated once, in ``lcr_fast.models.lcr.LCRModel``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class ConfigKeys:
    """A method's own ``model.*`` keys with their defaults, and how each is checked: ``integers`` at
    least 1, ``fractions`` in [0, 1], ``positives`` above 0, ``flags`` True or False. Every key of
    ``defaults`` is named in exactly one of them."""

    defaults: Mapping[str, Any]
    integers: tuple[str, ...] = ()
    fractions: tuple[str, ...] = ()
    positives: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checked = (*self.integers, *self.fractions, *self.positives, *self.flags)
        if sorted(checked) != sorted(self.defaults):
            raise ValueError(f"every key is checked exactly once: defaults {sorted(self.defaults)}, checked "
                             f"{sorted(checked)}")


@dataclass(frozen=True)
class ReferenceLayout:
    """A reference implementation's checkpoint file for a method, as ``lcr_fast.compat`` reads and writes it.

    ``prefixes``: (our state-dict prefix, the reference's prefixes for the same tensors), tried in turn;
    the first reference prefix is canonical. ``signature``: a key prefix only this layout has. ``unused``:
    the reference's keys (whole keys, or prefixes ending in ".") that no loss reads and our model does
    not hold. ``config_for(state, shape)``: config overrides whose model has the checkpoint's shapes
    (``shape(key)`` is a tensor's shape, an error naming the key where the file lacks it).
    ``extra_state`` and ``file``: dotted paths ("module:function") of what the export adds to the state
    (``f(model, state) -> dict``) and of the file's contents (``f(model, state, epoch) -> dict``); None:
    nothing added, and ``{"epoch", "state_dict"}``.
    """

    prefixes: tuple[tuple[str, tuple[str, ...]], ...]
    signature: str
    config_for: Callable[[Mapping[str, Any], Callable[[str], tuple]], dict]
    unused: tuple[str, ...] = ()
    extra_state: str | None = None
    file: str | None = None


@dataclass(frozen=True)
class Method:
    """One self-supervised method with the LCR branch: everything the trainer, the config, the optimizer,
    the checkpoint readers and the evaluation commands ask about it by name.

    ``model``: "module:Class" of its ``LCRModel`` subclass, imported when a model is built.
    ``recipe``: the augmentation recipe it trains with unless ``data.recipe`` names another.
    ``keys``: its ``model.*`` config keys. ``fixed_lr``: parameter-name prefixes that form the optimizer's
    "predictor" group, which every schedule keeps at its base rate (the SGD / AdamW groups; LARS splits by
    layer type). ``reference``: the layout of its reference checkpoints, None where it has none.
    ``paper_model``: the ``model`` config section of its model at the paper's scale (pretrained "none": the
    weights do not matter), whose kernel launches the ahead-of-time compile check records
    (``lcr_fast.kernel_aot``). ``final_linear_eval``: None when the trainer runs the reference's linear
    evaluation after training (BYOL's main.py), else why it does not. ``linear_protocol``: lcr-eval's default
    linear protocol.
    ``batch_error(model_section, global_batch)``: why a global batch (the keys of one step enqueued over all
    ranks) does not fit the model's configuration, None when it does.
    """

    name: str
    summary: str
    model: str
    recipe: str
    keys: ConfigKeys
    linear_protocol: str
    paper_model: Mapping[str, Any]
    final_linear_eval: str | None = None
    fixed_lr: tuple[str, ...] = ()
    reference: ReferenceLayout | None = None
    batch_error: Callable[[Mapping[str, Any], int], str | None] = field(default=lambda model, batch: None)

    def model_class(self) -> type:
        """The model's class, imported now (torch and the model's modules load here, not before)."""
        return load(self.model)


def load(path: str) -> Any:
    """The object a "package.module:name" path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
