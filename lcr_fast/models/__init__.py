"""Model construction from a config."""
from __future__ import annotations

import types

import torch
from torch import nn

from .. import methods
from ..config import COMPILE_MODES
from .backbone import ResNetTrunk
from .lcr import LCRModel


def build_model(config) -> LCRModel:
    """The model of ``config.model.name``'s method (lcr_fast.methods), with the LCR rationale branch."""
    return methods.get(config.model.name).model_class().from_config(config)


def compile_backbones(model: nn.Module, mode: str) -> None:
    """torch.compile every ResNet trunk of ``model`` in place; ``mode`` is one of COMPILE_MODES:
    inductor's ``default``, ``reduce-overhead`` (inductor with CUDA graphs), ``aot_eager`` (tracing
    only, no code generation: a check that the model compiles).

    Only the trunks: they hold nearly all the compute, and their backward is only ever taken once,
    while GradCAM's ``autograd.grad`` and the rationale loss's second path through cam run in the
    eager heads. Each trunk's ``forward`` is replaced on the instance, not wrapped in a new module, so
    parameter names and checkpoints do not change, and ``eager_backbones`` can put it back.
    """
    if mode == "none":
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {COMPILE_MODES}")
    options = {"backend": "aot_eager"} if mode == "aot_eager" else {"mode": mode}
    for module in model.modules():
        if isinstance(module, ResNetTrunk):
            # The class's forward, compiled and bound as a method: copy.deepcopy rebinds a method to the copy,
            # while a compiled bound forward would keep running the original trunk from every copy.
            module.forward = types.MethodType(torch.compile(type(module).forward, **options), module)


def eager_backbones(model: nn.Module) -> None:
    """Undo ``compile_backbones``: every ResNet trunk runs its class's eager ``forward`` again (the
    start-up check's fallback when compiling fails)."""
    for module in model.modules():
        if isinstance(module, ResNetTrunk):
            module.__dict__.pop("forward", None)
