"""ResNet trunks in torchvision's layout, returning the layer4 feature map.

Parameter names match torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), so a
torchvision ``.pth`` loads as it is (its ``fc`` dropped) and so do the reference's checkpoints.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torchvision import models as tvm

from ..errors import UserError

# The reference's BYOL backbones: ResNet-50 whose forward skips the stem max-pool (layer4 at input/16).
REFERENCE_BACKBONES = ("resnet50_cub200", "resnet50_stanfordcars", "resnet50_aircrafts")
_ARCHS = {"resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
          "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1)}


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights were asked for but cannot be had."""


class ResNetTrunk(nn.Module):
    """conv1 -> bn1 -> relu -> [maxpool] -> layer1..4; ``forward`` returns [B, C, h, w]."""

    def __init__(self, arch: str, maxpool: bool):
        super().__init__()
        net = _ARCHS[arch][0](weights=None)
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = net.maxpool if maxpool else nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.output_dim = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resolve_arch(backbone: str, maxpool: bool | None) -> tuple[str, bool]:
    """Map a config's backbone name (reference names included) to (torchvision arch, max-pool on)."""
    if backbone in REFERENCE_BACKBONES:
        return "resnet50", bool(maxpool) if maxpool is not None else False
    if backbone in _ARCHS:
        return backbone, True if maxpool is None else bool(maxpool)
    raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(_ARCHS) + list(REFERENCE_BACKBONES)}")


def _imagenet_state_dict(arch: str) -> dict:
    weights = _ARCHS[arch][1]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib raises many kinds when offline
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise PretrainedWeightsError(
            f"could not load torchvision's ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            f"Offline, put the torchvision file ({weights.url.rsplit('/', 1)[-1]}) in {cache} or set "
            f"model.pretrained to its path; model.pretrained=none trains from scratch."
        ) from exc


def load_pretrained(trunk: ResNetTrunk, arch: str, pretrained: str | None) -> None:
    """Initialise from torchvision's ImageNet weights ("imagenet"), a local .pth path, or nothing."""
    if pretrained in (None, "none", False):
        return
    if pretrained == "imagenet":
        state = _imagenet_state_dict(arch)
    else:
        if not os.path.isfile(pretrained):
            raise PretrainedWeightsError(f"model.pretrained file {pretrained!r} does not exist")
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise PretrainedWeightsError(
            f"pretrained weights do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:3]}"
        )
    trunk.load_state_dict(state)


def build_backbone(backbone: str, maxpool: bool | None = None, pretrained: str | None = None) -> ResNetTrunk:
    arch, use_maxpool = resolve_arch(backbone, maxpool)
    trunk = ResNetTrunk(arch, use_maxpool)
    load_pretrained(trunk, arch, pretrained)
    return trunk
