"""Reading and writing the reference's checkpoint layout (GANPerf/LCR ``main.py`` / ``main_moco.py``).

The reference saves ``{'epoch', 'state_dict'}``. Its BYOL module registers the backbone and projector
twice (``backbone.*`` and ``online_encoder.0.*`` are one tensor), names the EMA target
``target_encoder.{0,1}`` and the rationale detector ``conv16``/``bn16``. Ours names them
``target_backbone``, ``target_projector`` and ``rationale.{conv,bn}``; the tables below translate.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_save, safe_load
from .config import Config, load_config

# (our prefix, the reference's prefixes for the same tensors); the first reference name is canonical.
PREFIXES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "byol": [
        ("backbone.", ("backbone.", "online_encoder.0.")),
        ("projector.", ("projector.", "online_encoder.1.")),
        ("predictor.", ("online_predictor.",)),
        ("target_backbone.", ("target_encoder.0.",)),
        ("target_projector.", ("target_encoder.1.",)),
        ("rationale.conv.", ("conv16.",)),
        ("rationale.bn.", ("bn16.",)),
    ],
}
# A key prefix that identifies each method's checkpoints, for a clear error when they are mixed up.
SIGNATURES = {"byol": "online_predictor.", "moco": "encoder_q."}


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def _to_reference_key(key: str, method: str) -> list[str]:
    for ours, refs in PREFIXES[method]:
        if key.startswith(ours):
            return [ref + key[len(ours):] for ref in refs]
    raise KeyError(f"no reference name for parameter {key!r}")


def _from_reference(state: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    out = {}
    for ref_key, value in state.items():
        for ours, refs in PREFIXES[method]:
            if ref_key.startswith(refs[0]):
                out[ours + ref_key[len(refs[0]):]] = value
                break
    return out


def read_reference_checkpoint(path: str | os.PathLike, trust_file: bool = False) -> tuple[dict[str, torch.Tensor], int | None]:
    """The reference checkpoint's state dict (``module.`` prefixes removed) and epoch."""
    raw: Any = safe_load(path, trust_file=trust_file)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{os.fspath(path)!r} holds no state_dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    epoch = raw.get("epoch") if isinstance(raw, dict) else None
    return state, epoch


def _detect_method(state: dict) -> str | None:
    for method, prefix in SIGNATURES.items():
        if any(k.startswith(prefix) for k in state):
            return method
    return None


def _config_for(state: dict[str, torch.Tensor], method: str) -> Config:
    """A config whose model has the checkpoint's shapes (backbone width, head sizes), from scratch."""
    if method == "byol":
        width = state["backbone.layer4.0.conv1.weight"].shape[1] if "backbone.layer4.0.conv1.weight" in state else None
        backbone = "resnet50_cub200" if width == 1024 else "resnet18"
        return load_config(None, {
            "model": {
                "name": "byol", "backbone": backbone, "pretrained": "none",
                "proj_hidden_dim": int(state["projector.layer1.0.weight"].shape[0]),
                "proj_dim": int(state["projector.layer2.weight"].shape[0]),
                "rationale_channels": int(state["conv16.weight"].shape[0]),
            }
        })
    raise ValueError(f"unknown method {method!r}")


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


def load_reference_checkpoint(path: str | os.PathLike, method: str, config: Config | None = None,
                              trust_file: bool = False) -> nn.Module:
    """Build our model from a reference checkpoint with identical numbers.

    Without ``config`` the model's shapes come from the checkpoint (ResNet-50 or -18, head sizes) and
    the rest from the defaults (the reference's semantics). ``trust_file`` allows a full pickle load
    for a file you trust; by default only tensors and plain containers are read.
    """
    from .models import build_model

    if method not in PREFIXES:
        raise ValueError(f"method must be one of {sorted(PREFIXES)}, got {method!r}")
    state, _ = read_reference_checkpoint(path, trust_file)
    found = _detect_method(state)
    if found is not None and found != method:
        raise CheckpointMismatchError(f"{os.fspath(path)!r} is a {found} checkpoint, not {method}")
    if found is None:
        raise CheckpointMismatchError(f"{os.fspath(path)!r} has none of the reference's {method} keys (e.g. {SIGNATURES[method]}*)")
    cfg = config if config is not None else _config_for(state, method)
    model = build_model(cfg)
    load_state_strict(model, _from_reference(state, method), os.fspath(path))
    return model


def reference_state_dict(model: nn.Module, method: str | None = None) -> dict[str, torch.Tensor]:
    """Our model's state in the reference's key names; aliased names share one tensor, as the reference's."""
    method = method or model_method(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for ref_key in _to_reference_key(key, method):
            out[ref_key] = value.detach().cpu()
    return out


def model_method(model: nn.Module) -> str:
    from .models.byol import BYOL

    if isinstance(model, BYOL):
        return "byol"
    raise ValueError(f"no reference layout for {type(model).__name__}")


def export_reference_checkpoint(model: nn.Module, path: str | os.PathLike, epoch: int = 0) -> None:
    """Write ``{'epoch', 'state_dict'}`` in the reference's key names (atomically)."""
    atomic_save({"epoch": epoch, "state_dict": reference_state_dict(model)}, path)


__all__ = [
    "CheckpointMismatchError", "export_reference_checkpoint", "load_reference_checkpoint", "load_state_strict",
    "read_reference_checkpoint", "reference_state_dict",
]
