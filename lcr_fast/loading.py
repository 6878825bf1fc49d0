"""Build a model from any checkpoint a user may hand us: ours (training) or the reference's."""
from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import safe_load
from . import methods
from .compat import CheckpointMismatchError, load_reference_checkpoint, load_state_strict
from .config import Config, load_config
from .errors import USER_ERRORS, InputError


def without_pretrained(config: dict) -> Config:
    """The config with model.pretrained off: the weights come from the checkpoint, nothing is downloaded."""
    return load_config(None, {**config, "model": {**config["model"], "pretrained": "none"}})


def load_model(path: str | os.PathLike, method: str | None = None,
               config: Config | dict | None = None) -> tuple[nn.Module, Config]:
    """(model, config) from ``path``.

    Our training checkpoints carry their config, which is used as saved; a ``method`` that differs
    from it is an error. For a reference checkpoint ``method`` is required (a method with a reference
    layout: lcr_fast.methods.with_reference_layout()), and
    ``config`` (if given) fixes what the file cannot tell, such as the stem max-pool.
    """
    from .models import build_model

    path = os.fspath(path)
    raw = safe_load(path)
    if isinstance(raw, dict) and raw.get("format") == "lcr-fast/1":
        saved = without_pretrained(raw["config"])
        if method is not None and saved.model.name != method:
            raise CheckpointMismatchError(f"{path!r} is a {saved.model.name} checkpoint, not {method}")
        model = build_model(saved)
        load_state_strict(model, raw["model"], path)
        return model, saved
    if method is None:
        raise ValueError(f"{path!r} is not an lcr-fast checkpoint: say which method it holds "
                         f"({' or '.join(methods.with_reference_layout())})")
    cfg = without_pretrained(config) if config is not None else None
    model = load_reference_checkpoint(path, method, config=cfg)
    return model, cfg if cfg is not None else load_config(None, {"model": {"name": method, "pretrained": "none"}})


def load_for_eval(ckpt: str, method: str | None = None, config_path: str | None = None) -> tuple[nn.Module, Config]:
    """(model, config) for the evaluation commands: ``load_model`` with a YAML ``config_path`` for
    reference files; ``method`` defaults to that YAML's model.name. Input problems raise one of
    USER_ERRORS."""
    config = load_config(config_path) if config_path is not None else None
    method = method or (config.model.name if config is not None else None)
    try:
        return load_model(ckpt, method, config.to_dict() if config is not None else None)
    except USER_ERRORS:
        raise
    except ValueError as exc:  # e.g. a reference file without a method
        raise InputError(str(exc)) from exc


def resolve_device(name: str | None) -> torch.device:
    """``name`` ("cuda", "cuda:1", "cpu") as a torch.device (default: CUDA when available); InputError
    for a name torch does not know or CUDA asked for where there is none."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise InputError(f"unknown --device {name!r} ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name} asked for, but CUDA is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {name} asked for, but {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")
        if device.index is not None:
            # Triton launches on the current device, not on its tensors': it must be the one the model is on.
            torch.cuda.set_device(device)
    return device
