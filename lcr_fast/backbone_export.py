"""A model's online backbone as a plain torchvision state dict, with a JSON card beside it.

torchvision's ``resnet50()`` (and timm's ResNet, which uses the same key names) loads the state dict
with ``strict=False``, only ``fc.weight`` and ``fc.bias`` missing. What the keys cannot say goes in
the card: the architecture, and whether the stem max-pool runs. The reference's BYOL backbone skips
it (layer4 at input/16), so a user must set ``model.maxpool = torch.nn.Identity()`` to compute what
was trained; the card says so in its ``usage`` lines.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_save
from .errors import InputError
from .models.backbone import ResNetTrunk, infer_arch

CARD_FORMAT = "lcr-fast-backbone/1"
WEIGHT_SUFFIXES = (".pth", ".pt")
# What torchvision's ResNet has and the trunk has not: the classifier, which self-supervised training never trains.
TORCHVISION_ONLY_KEYS = ("fc.weight", "fc.bias")


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The online backbone's parameters and BatchNorm buffers in torchvision's key names, on the CPU, detached
    from the model (a later training step does not change them)."""
    trunk = model.backbone
    if not isinstance(trunk, ResNetTrunk):
        raise InputError(f"the model's backbone is a {type(trunk).__name__}, not a ResNet trunk: nothing to export")
    return {k: v.detach().cpu().clone() for k, v in trunk.state_dict().items()}


def usage_lines(arch: str, stem_maxpool: bool, weights_name: str) -> list[str]:
    """Python lines that build torchvision's model computing what the exported backbone computed."""
    lines = ["import torch, torchvision",
             f"model = torchvision.models.{arch}()",
             f"missing, unexpected = model.load_state_dict(torch.load({weights_name!r}), strict=False)",
             f"assert sorted(missing) == {sorted(TORCHVISION_ONLY_KEYS)} and not unexpected"]
    if not stem_maxpool:
        lines.append("model.maxpool = torch.nn.Identity()  # trained without the stem max-pool: layer4 at input/16")
    lines.append("model.fc = torch.nn.Identity()  # fc was never trained: the output is the pooled layer4 feature")
    return lines


def backbone_card(model: nn.Module, weights_name: str, source: dict) -> dict:
    """The card written beside the weights: arch, stem_maxpool, feature width and stride, source, usage."""
    trunk = model.backbone
    state = trunk.state_dict()
    arch = infer_arch(state)
    if arch is None:
        raise InputError("the model's backbone matches none of torchvision's ResNets: nothing to export")
    stem_maxpool = trunk.has_maxpool
    return {
        "format": CARD_FORMAT,
        "weights": weights_name,
        "arch": arch,
        "stem_maxpool": stem_maxpool,
        "output_dim": trunk.output_dim,
        "layer4_stride": 32 if stem_maxpool else 16,
        "source": source,
        "torchvision_missing_keys": list(TORCHVISION_ONLY_KEYS),
        "usage": usage_lines(arch, stem_maxpool, weights_name),
    }


def card_path(weights_path: str | os.PathLike) -> Path:
    """``backbone.pth`` -> ``backbone.json``."""
    return Path(weights_path).with_suffix(".json")


def write_backbone(model: nn.Module, out: str | os.PathLike, source: dict) -> tuple[Path, Path]:
    """Write the state dict to ``out`` (.pth or .pt) and its card beside it; returns both paths."""
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"--out {str(out)!r} must end with {' or '.join(WEIGHT_SUFFIXES)}")
    card = backbone_card(model, out.name, source)
    atomic_save(backbone_state_dict(model), out)
    card_file = card_path(out)
    tmp = card_file.with_name(f".tmp-{card_file.name}")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, card_file)
    return out, card_file
