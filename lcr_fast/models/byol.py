"""BYOL with the LCR rationale branch, computing what the reference's ``models/byol.py`` + ``main.py`` compute."""
from __future__ import annotations

import copy

import torch
from torch import nn

from lcr_fast.kernels import byol_loss, ema_update
from lcr_fast.lcr import RationaleBranch

from .backbone import both_views, build_backbone
from .heads import MLP
from .lcr import LCRModel, global_pool


class BYOL(LCRModel):
    """Online network (backbone, projector, predictor), EMA target, rationale detector.

    ``forward`` changes no parameter: the EMA step is ``momentum_update()``, which
    ``lcr_fast.loop.train_step`` calls once per optimizer step right before that step's first forward
    (the reference runs it at the start of its forward, so its checkpoints hold weights whose EMA is
    still pending). The KL is the reference's: over the flattened h*w at temperature
    ``rationale_temperature``.
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_dim: int = 256, tau: float = 0.996,
                 rationale_channels: int = 32, rationale_weight: float = 0.01, rationale_temperature: float = 0.4,
                 per_sample_minmax: bool = False, detach_cam: bool = False, scale_cam: bool = False):
        super().__init__(backbone)
        self.projector = MLP(backbone.output_dim, proj_hidden_dim, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden_dim, proj_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        self.rationale = RationaleBranch(backbone.output_dim, rationale_channels, temperature=rationale_temperature,
                                         weight=rationale_weight, per_sample_minmax=per_sample_minmax,
                                         detach_cam=detach_cam, scale_cam=scale_cam)
        self.tau = tau

    @classmethod
    def from_config(cls, config) -> BYOL:
        m, fixes = config.model, config.fixes
        return cls(build_backbone(m.backbone, m.maxpool, m.pretrained), proj_hidden_dim=m.proj_hidden_dim,
                   proj_dim=m.proj_dim, tau=m.ema_tau, rationale_channels=m.rationale_channels,
                   rationale_weight=m.rationale_weight, rationale_temperature=m.rationale_temperature,
                   per_sample_minmax=fixes.per_sample_minmax, detach_cam=fixes.detach_cam, scale_cam=fixes.scale_cam)

    def online_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def target_parameters(self) -> list[nn.Parameter]:
        return list(self.target_backbone.parameters()) + list(self.target_projector.parameters())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """target <- tau * target + (1 - tau) * online, parameters only (BN statistics move by their own passes)."""
        ema_update(self.target_parameters(), self.online_parameters(), self.tau)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        feat1, feat2 = both_views(self.backbone, view1, view2)
        # The heads run in fp32 even under autocast: GradCAM's gradient on layer4, which the rationale
        # loss is fitted to, lies below fp16's range, and the heads cost little next to the backbone.
        # Both views go through each head as one batch (BatchNorm still per view): at batch 8 a head's
        # matmuls read their weights (33.5 MB for the projector's first) for a few rows, and the step's
        # matmuls fell from 0.076-0.080 to 0.042-0.043 s (2026-12-07, Zen 3, docs/benchmarks.md).
        with torch.autocast(feat1.device.type, enabled=False):
            cam_feat = feat1.float()  # feat1 itself in fp32 training
            pooled = torch.cat([global_pool(cam_feat), global_pool(feat2.float())])
            p1, p2 = self.predictor(self.projector(pooled, views=2), views=2).chunk(2)
        with torch.no_grad():
            target = torch.cat([global_pool(f) for f in both_views(self.target_backbone, view1, view2)])
            z1_t, z2_t = self.target_projector(target, views=2).chunk(2)
        ssl_loss = byol_loss(p1, z2_t, p2, z1_t)
        return self.lcr_terms(ssl_loss, cam_feat, self.rationale(feat1))
