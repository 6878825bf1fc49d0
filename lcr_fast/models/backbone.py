"""ResNet trunks in torchvision's layout, returning the layer4 feature map.

Parameter names match torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), so a
torchvision (or timm: same names) ``.pth`` loads as it is, its ``fc`` dropped, and so do the
reference's checkpoints and what ``lcr-export backbone`` writes.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping

import torch
from torch import nn
from torchvision import models as tvm

from ..errors import UserError
from ..kernels.batch_norm_act import batch_norm_act, fused_path
from ..kernels.conv2d import conv2d

# torchvision's ResNet family by its own names, with the ImageNet weights model.pretrained=imagenet reads (V1,
# the weights the paper and the reference start from for ResNet-50).
ARCHS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
    "resnet152": (tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V1),
    "wide_resnet50_2": (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
    "resnext50_32x4d": (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
}
# The reference's BYOL backbones: ResNet-50 whose forward skips the stem max-pool (layer4 at input/16).
REFERENCE_BACKBONES = ("resnet50_cub200", "resnet50_stanfordcars", "resnet50_aircrafts")
BACKBONE_NAMES = (*ARCHS, *REFERENCE_BACKBONES)
# Wrappers and prefixes of weight files written by training scripts (timm and torchvision's references save
# {"state_dict": ...} or {"model": ...}; DistributedDataParallel prefixes every key with "module.").
_WRAPPER_KEYS = ("state_dict", "model")
_DDP_PREFIX = "module."


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights were asked for but cannot be had, or a weights file does not fit the backbone."""


class UnknownBackboneError(UserError, ValueError):
    """A backbone name that is not one of BACKBONE_NAMES."""


class ResNetTrunk(nn.Module):
    """conv1 -> bn1 -> relu -> [maxpool] -> layer1..4; ``forward`` returns [B, C, h, w]."""

    def __init__(self, arch: str, maxpool: bool):
        super().__init__()
        net = ARCHS[arch][0](weights=None)
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = net.maxpool if maxpool else nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.output_dim = net.fc.in_features

    @property
    def has_maxpool(self) -> bool:
        return not isinstance(self.maxpool, nn.Identity)

    def forward(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        """The layer4 feature map of ``x``; with ``views`` > 1, ``x`` is that many equal batches one after the
        other (views of the same images), each normalised by its own BatchNorm statistics, as if each went
        through on its own (``batches_views`` says where that is cheaper)."""
        # torchvision's forward, block by block, with each BatchNorm and the add and ReLU after it as one
        # batch_norm_act: fused on the CPU in training, torchvision's own ops elsewhere (lcr_fast.kernels); each
        # convolution through conv2d, which computes the stride-1 ones' weight gradients as matrix products there.
        x = self.maxpool(batch_norm_act(conv2d(self.conv1, x), self.bn1, views=views))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block_forward(block, x, views)
        return x

    def batches_views(self, x: torch.Tensor) -> bool:
        """Whether several views like ``x`` should go through as one batch (``forward(cat, views=n)``): in
        training, where every BatchNorm takes the fused CPU operator, which keeps each view's statistics in the
        same pass; the convolutions then run once on twice the rows and each weight gets one gradient instead of
        a sum of two. Measured with ``python benchmarks/views_bench.py`` on the 2-core AMD EPYC (Zen 3, fp32) of
        2026-12-07, ResNet-50 without max-pool, two views of 8 at 112 px, twice: forward and backward 1.05-1.08x
        and the no-grad forward 1.03-1.10x less time as one batch. Not where the trunk is compiled (its
        BatchNorms would take the plain path, which splits and concatenates) nor on a GPU (unmeasured)."""
        return self.training and "forward" not in self.__dict__ and fused_path(x)


def both_views(trunk: nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's layer4 feature map: as one batch with per-view BatchNorm where the trunk says that is cheaper
    (``ResNetTrunk.batches_views``), else a call per view (any other trunk: a model built around one's own, or
    the launch recorder's stand-in); the same numbers to float rounding either way."""
    if isinstance(trunk, ResNetTrunk) and trunk.batches_views(view1):
        return trunk(torch.cat([view1, view2]), views=2).chunk(2)
    return trunk(view1), trunk(view2)


def block_forward(block: nn.Module, x: torch.Tensor, views: int = 1) -> torch.Tensor:
    """torchvision's ``BasicBlock`` or ``Bottleneck`` forward, through ``conv2d`` and ``batch_norm_act``."""
    out = batch_norm_act(conv2d(block.conv1, x), block.bn1, views=views)
    if isinstance(block, tvm.resnet.Bottleneck):
        out = batch_norm_act(conv2d(block.conv2, out), block.bn2, views=views)
        last_conv, last_bn = block.conv3, block.bn3
    else:
        last_conv, last_bn = block.conv2, block.bn2
    identity = x
    if block.downsample is not None:
        conv, bn = block.downsample
        identity = batch_norm_act(conv2d(conv, x), bn, relu=False, views=views)
    return batch_norm_act(conv2d(last_conv, out), last_bn, identity, views=views)


def resolve_arch(backbone: str, maxpool: bool | None) -> tuple[str, bool]:
    """Map a config's backbone name (reference names included) to (torchvision arch, max-pool on)."""
    if backbone in REFERENCE_BACKBONES:
        return "resnet50", bool(maxpool) if maxpool is not None else False
    if backbone in ARCHS:
        return backbone, True if maxpool is None else bool(maxpool)
    raise UnknownBackboneError(
        f"unknown backbone {backbone!r}; expected one of {', '.join(ARCHS)} (torchvision's, with the stem max-pool "
        f"unless model.maxpool=false) or the reference's {', '.join(REFERENCE_BACKBONES)} (ResNet-50 without it)")


@functools.lru_cache(maxsize=None)
def _signature(arch: str) -> frozenset:
    """The (key, shape) pairs of ``arch``'s trunk, from a model on the meta device (no storage)."""
    with torch.device("meta"):
        return frozenset((k, tuple(v.shape)) for k, v in ResNetTrunk(arch, True).state_dict().items())


def infer_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The torchvision arch whose trunk has exactly the keys and shapes of ``state`` (``fc.*`` ignored), or None.

    Depth shows in the keys, width and grouping (Wide ResNet, ResNeXt) only in the shapes. The archs are
    tried smallest first and built only as far as needed: all seven cost about 2 s on a shared CPU core.
    """
    found = frozenset((k, tuple(v.shape)) for k, v in state.items() if not k.startswith("fc."))
    return next((arch for arch in ARCHS if _signature(arch) == found), None)


def _imagenet_state_dict(arch: str) -> dict:
    weights = ARCHS[arch][1]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib raises many kinds when offline
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise PretrainedWeightsError(
            f"could not load torchvision's ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            f"Offline, put the torchvision file ({weights.url.rsplit('/', 1)[-1]}) in {cache} or set "
            f"model.pretrained to its path; model.pretrained=none trains from scratch."
        ) from exc


def read_weights_file(path: str) -> dict[str, torch.Tensor]:
    """The trunk's tensors in a local weights file: a plain state dict (torchvision's, timm's, ``lcr-export
    backbone``'s) or one under ``state_dict`` / ``model``, ``module.`` prefixes removed, ``fc.*`` dropped."""
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"model.pretrained file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file torch cannot read raises pickle, zip or runtime errors
        raise PretrainedWeightsError(f"model.pretrained file {path!r} is not a torch weights file "
                                     f"({type(exc).__name__}: {exc})") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"model.pretrained file {path!r} holds no state dict of tensors")
    state = {k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_pretrained(trunk: ResNetTrunk, arch: str, pretrained: str | None) -> None:
    """Initialise from torchvision's ImageNet weights ("imagenet"), a local weights file, or nothing."""
    if pretrained in (None, "none", False):
        return
    state = {k: v for k, v in _imagenet_state_dict(arch).items() if not k.startswith("fc.")} \
        if pretrained == "imagenet" else read_weights_file(pretrained)
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        holds = infer_arch(state)
        raise PretrainedWeightsError(
            f"pretrained weights do not fit {arch}{f' (the file holds a {holds})' if holds else ''}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:3]}"
        )
    trunk.load_state_dict(state)


def build_backbone(backbone: str, maxpool: bool | None = None, pretrained: str | None = None) -> ResNetTrunk:
    arch, use_maxpool = resolve_arch(backbone, maxpool)
    trunk = ResNetTrunk(arch, use_maxpool)
    load_pretrained(trunk, arch, pretrained)
    return trunk
