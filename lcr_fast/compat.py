"""Reading and writing the reference's checkpoint layout (GANPerf/LCR ``main.py`` / ``main_moco.py``).

Each method declares its layout (``lcr_fast.methods.<name>``'s ``ReferenceLayout``: key prefixes, the
signature key, the unused tensors, the config of a file's shapes, and what an export adds); the
machinery here reads and writes any of them. A method without one has no reference file.

BYOL: the reference saves ``{'epoch', 'state_dict'}``. Its BYOL module registers the backbone and projector
twice (``backbone.*`` and ``online_encoder.0.*`` are one tensor), names the EMA target
``target_encoder.{0,1}`` and the rationale detector ``conv16``/``bn16``. Ours names them
``target_backbone``, ``target_projector`` and ``rationale.{conv,bn}``; its layout (lcr_fast.methods.byol)
translates.

MoCo: ``main_moco.py`` saves ``checkpoint_XXXX.pth.tar`` = ``{'epoch', 'arch', 'state_dict', 'optimizer'}``
from its DDP module (every key ``module.``-prefixed). ``encoder_q``/``encoder_k`` (``.fc`` the head) are
our ``backbone``/``projector`` and ``key_backbone``/``key_projector``. Its unused max branch (``fc``,
``qmax``, ``kmax`` — whose last Linear *is* ``fc`` —, ``conv16_2``, ``bn16_2``, ``queue_max``,
``queue_ptr_max``) has no counterpart in our model: a model read from a reference file keeps those
tensors aside (``model.reference_extras``, CPU, outside the state dict) and writes them back unchanged;
any other model writes deterministic values (seed 0, the reference's initialisation; ``queue_ptr_max``
equal to ``queue_ptr``, as the reference advances both together). They never enter a loss, so their
values change no number the reference computes. The ``optimizer`` entry is ignored on reading (with a
printed note when it holds momentum buffers); on writing it is a fresh SGD state (lr 0.03, momentum 0.9,
weight decay 1e-4, no momentum buffers) that the reference's ``--resume`` accepts.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import methods
from .checkpoint import atomic_save, safe_load
from .config import Config, load_config
from .errors import UserError
from .methods.base import load

# The layouts the methods declare, by method name.
_LAYOUTS = {name: methods.get(name).reference for name in methods.with_reference_layout()}


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def _to_reference_key(key: str, method: str) -> list[str]:
    for ours, refs in _LAYOUTS[method].prefixes:
        if key.startswith(ours):
            return [ref + key[len(ours):] for ref in refs]
    raise KeyError(f"no reference name for parameter {key!r}")


def _is_unused(ref_key: str, method: str) -> bool:
    return any(ref_key == u or (u.endswith(".") and ref_key.startswith(u)) for u in _LAYOUTS[method].unused)


def _from_reference(state: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    out = {}
    for ref_key, value in state.items():
        if _is_unused(ref_key, method):
            continue
        for ours, refs in _LAYOUTS[method].prefixes:
            if ref_key.startswith(refs[0]):
                out[ours + ref_key[len(refs[0]):]] = value
                break
    return out


def read_reference_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int | None]:
    """The reference checkpoint's state dict (``module.`` prefixes removed) and epoch."""
    raw: Any = safe_load(path)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{os.fspath(path)!r} holds no state_dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    epoch = raw.get("epoch") if isinstance(raw, dict) else None
    optimizer = raw.get("optimizer") if isinstance(raw, dict) else None
    if isinstance(optimizer, dict) and optimizer.get("state"):
        print(f"note: {os.fspath(path)!r}: its optimizer state (the reference's SGD momentum) is not loaded; "
              "training from it starts with fresh optimizer state")
    return state, epoch


def _detect_method(state: dict) -> str | None:
    for method, layout in _LAYOUTS.items():
        if any(k.startswith(layout.signature) for k in state):
            return method
    return None


def _shape(state: dict[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state:
        raise CheckpointMismatchError(f"reference checkpoint lacks {key!r}")
    return state[key].shape


def _config_for(state: dict[str, torch.Tensor], method: str) -> Config:
    """A config whose model has the checkpoint's shapes (backbone width, head sizes), from scratch."""
    return load_config(None, _LAYOUTS[method].config_for(state, lambda key: _shape(state, key)))


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; on any difference raise naming the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise CheckpointMismatchError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_reference_checkpoint(path: str | os.PathLike, method: str, config: Config | None = None) -> nn.Module:
    """Build our model from a reference checkpoint with identical numbers.

    Without ``config`` the model's shapes come from the checkpoint (ResNet-50 or -18, head sizes) and
    the rest from the defaults (the reference's semantics). Only tensors and plain containers are
    read (``checkpoint.safe_load``).
    """
    from .models import build_model

    if method not in _LAYOUTS:
        raise ValueError(f"method must be one of {sorted(_LAYOUTS)}, got {method!r}")
    state, _ = read_reference_checkpoint(path)
    found = _detect_method(state)
    if found is not None and found != method:
        raise CheckpointMismatchError(f"{os.fspath(path)!r} is a {found} checkpoint, not {method}")
    if found is None:
        raise CheckpointMismatchError(f"{os.fspath(path)!r} has none of the reference's {method} keys "
                                      f"(e.g. {_LAYOUTS[method].signature}*)")
    cfg = config if config is not None else _config_for(state, method)
    model = build_model(cfg)
    load_state_strict(model, _from_reference(state, method), os.fspath(path))
    if _LAYOUTS[method].unused:
        model.reference_extras = {k: v for k, v in state.items() if _is_unused(k, method)}
    return model


def reference_state_dict(model: nn.Module, method: str | None = None) -> dict[str, torch.Tensor]:
    """Our model's state in the reference's key names; aliased names share one tensor, as the reference's."""
    method = method or model_method(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for ref_key in _to_reference_key(key, method):
            out[ref_key] = value.detach().cpu()
    extra = _LAYOUTS[method].extra_state
    if extra is not None:
        out.update(load(extra)(model, out))
    return out


def moco_unused_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference MoCo's max-branch tensors: those read from its file if the model came from one,
    else deterministic values (seed 0) drawn as the reference initialises them."""
    width, dim, K = model.backbone.output_dim, state["queue"].shape[0], state["queue"].shape[1]
    channels = state["conv16.weight"].shape[0]
    shapes = {"queue_max": (dim, K), "queue_ptr_max": (1,), "conv16_2.weight": (1, channels, 1, 1),
              "bn16_2.weight": (1,), "bn16_2.bias": (1,), "bn16_2.running_mean": (1,), "bn16_2.running_var": (1,),
              "bn16_2.num_batches_tracked": (), "fc.weight": (dim, width), "fc.bias": (dim,),
              "qmax.0.weight": (width, width), "qmax.0.bias": (width,),
              "kmax.0.weight": (width, width), "kmax.0.bias": (width,)}
    kept = getattr(model, "reference_extras", None) or {}
    if all(k in kept and tuple(kept[k].shape) == s for k, s in shapes.items()):
        out = {k: kept[k] for k in shapes}
    else:
        g = torch.Generator().manual_seed(0)

        def uniform(shape, fan_in):  # nn.Linear / nn.Conv2d's default initialisation
            bound = 1.0 / fan_in ** 0.5
            return (torch.rand(shape, generator=g) * 2 - 1) * bound

        out = {"queue_max": F.normalize(torch.randn(dim, K, generator=g), dim=0),
               "queue_ptr_max": state["queue_ptr"].clone(),
               "conv16_2.weight": uniform((1, channels, 1, 1), channels),
               "bn16_2.weight": torch.ones(1), "bn16_2.bias": torch.zeros(1),
               "bn16_2.running_mean": torch.zeros(1), "bn16_2.running_var": torch.ones(1),
               "bn16_2.num_batches_tracked": torch.tensor(0),
               "fc.weight": uniform((dim, width), width), "fc.bias": uniform((dim,), width),
               "qmax.0.weight": uniform((width, width), width), "qmax.0.bias": uniform((width,), width)}
        out["kmax.0.weight"], out["kmax.0.bias"] = out["qmax.0.weight"].clone(), out["qmax.0.bias"].clone()
    # qmax and kmax end in the reference's one ``fc`` module: the same tensors under three names.
    for branch in ("qmax", "kmax"):
        out[f"{branch}.2.weight"], out[f"{branch}.2.bias"] = out["fc.weight"], out["fc.bias"]
    return out


def model_method(model: nn.Module) -> str:
    """The name of ``model``'s method; ValueError when that method has no reference layout."""
    method = methods.of_model(model).name
    if method not in _LAYOUTS:
        raise ValueError(f"no reference layout for {type(model).__name__} ({method} has no reference checkpoints)")
    return method


def has_reference_layout(model: nn.Module) -> bool:
    """Whether ``model``'s method has a reference checkpoint layout to export."""
    return methods.of_model(model).name in _LAYOUTS


def _reference_sgd_state(state: dict[str, torch.Tensor]) -> dict:
    """A fresh ``torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)`` state for the
    reference MoCo (one group; its parameters() lists each shared tensor once), as ``main_moco.py`` saves."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = [k for k in state if k not in ("queue", "queue_ptr", "queue_max", "queue_ptr_max")
              and not k.endswith(buffers) and not k.startswith(("qmax.2.", "kmax.2."))]
    group = {"lr": 0.03, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False, "maximize": False,
             "foreach": None, "differentiable": False, "fused": None, "params": list(range(len(params)))}
    return {"state": {}, "param_groups": [group]}


def _arch_name(model: nn.Module) -> str:
    """torchvision's name of the query encoder's ResNet, as ``main_moco.py``'s ``--arch`` saves it."""
    from .models.backbone import infer_arch

    return infer_arch(model.backbone.state_dict()) or "resnet50"


def moco_reference_file(model: nn.Module, state: dict[str, torch.Tensor], epoch: int) -> dict:
    """``main_moco.py``'s file: ``{'epoch', 'arch', 'state_dict', 'optimizer'}``, keys ``module.``-prefixed."""
    return {"epoch": epoch, "arch": _arch_name(model), "state_dict": {"module." + k: v for k, v in state.items()},
            "optimizer": _reference_sgd_state(state)}


def export_reference_checkpoint(model: nn.Module, path: str | os.PathLike, epoch: int = 0) -> None:
    """Write the reference's layout (atomically): BYOL ``{'epoch', 'state_dict'}``; MoCo ``main_moco.py``'s
    ``{'epoch', 'arch', 'state_dict', 'optimizer'}`` with ``module.``-prefixed keys, max branch included."""
    method = model_method(model)
    state = reference_state_dict(model, method)
    file = _LAYOUTS[method].file
    atomic_save(load(file)(model, state, epoch) if file is not None else {"epoch": epoch, "state_dict": state}, path)


__all__ = [
    "CheckpointMismatchError", "export_reference_checkpoint", "has_reference_layout", "load_reference_checkpoint",
    "load_state_strict", "read_reference_checkpoint", "reference_state_dict",
]
