"""Build a model from any checkpoint a user may hand us: ours (training) or the reference's."""
from __future__ import annotations

import os

from torch import nn

from .checkpoint import safe_load
from .compat import SIGNATURES, CheckpointMismatchError, load_reference_checkpoint, load_state_strict
from .config import Config, load_config


def without_pretrained(config: dict) -> Config:
    """The config with model.pretrained off: the weights come from the checkpoint, nothing is downloaded."""
    return load_config(None, {**config, "model": {**config["model"], "pretrained": "none"}})


def load_model(path: str | os.PathLike, method: str | None = None, config: Config | dict | None = None,
               trust_file: bool = False) -> tuple[nn.Module, Config]:
    """(model, config) from ``path``.

    Our training checkpoints carry their config, which is used as saved; a ``method`` that differs
    from it is an error. For a reference checkpoint ``method`` is required ("byol" | "moco"), and
    ``config`` (if given) fixes what the file cannot tell, such as the stem max-pool.
    """
    from .models import build_model

    path = os.fspath(path)
    raw = safe_load(path, trust_file=trust_file)
    if isinstance(raw, dict) and raw.get("format") == "lcr-fast/1":
        saved = without_pretrained(raw["config"])
        if method is not None and saved.model.name != method:
            raise CheckpointMismatchError(f"{path!r} is a {saved.model.name} checkpoint, not {method}")
        model = build_model(saved)
        load_state_strict(model, raw["model"], path)
        return model, saved
    if method is None:
        raise ValueError(f"{path!r} is not an lcr-fast checkpoint: say which method it holds ({' or '.join(SIGNATURES)})")
    cfg = without_pretrained(config) if config is not None else None
    model = load_reference_checkpoint(path, method, config=cfg, trust_file=trust_file)
    return model, cfg if cfg is not None else load_config(None, {"model": {"name": method, "pretrained": "none"}})
