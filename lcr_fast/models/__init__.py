"""Model construction from a config."""
from __future__ import annotations

from torch import nn

from .backbone import build_backbone


def build_model(config) -> nn.Module:
    """BYOL or MoCo v2 with the LCR rationale branch, as ``config.model.name`` says."""
    m, fixes = config.model, config.fixes
    if m.name == "byol":
        from .byol import BYOL

        backbone = build_backbone(m.backbone, m.maxpool, m.pretrained)
        return BYOL(backbone, m.proj_hidden_dim, m.proj_dim, m.ema_tau, m.rationale_channels, m.rationale_weight,
                    m.rationale_temperature, fixes.per_sample_minmax, fixes.detach_cam)
    if m.name == "moco":
        from .moco import MoCo

        backbone = build_backbone(m.backbone, m.maxpool, m.pretrained)
        return MoCo(backbone, m.moco_dim, m.moco_k, m.moco_m, m.moco_t, m.moco_mlp, m.rationale_channels,
                    m.rationale_weight, fixes.per_sample_minmax, fixes.flatten_kl, fixes.detach_cam)
    raise ValueError(f"unknown model {m.name!r}")
