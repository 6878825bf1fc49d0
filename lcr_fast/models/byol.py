"""BYOL with the LCR rationale branch, computing what the reference's ``models/byol.py`` + ``main.py`` compute."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lcr_fast.kernels import byol_loss, ema_update, gradcam, rationale_kl
from lcr_fast.objective import lcr_objective

from .heads import MLP
from .rationale import RationaleDetector, per_image_unit


def global_pool(feat: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(feat, 1).flatten(1)


class BYOL(nn.Module):
    """Online network (backbone, projector, predictor), EMA target, rationale detector.

    ``forward`` changes no parameter: the EMA step is ``momentum_update()``, which
    ``lcr_fast.loop.train_step`` calls once per optimizer step right before that step's first forward
    (the reference runs it at the start of its forward, so its checkpoints hold weights whose EMA is
    still pending).
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_dim: int = 256, tau: float = 0.996,
                 rationale_channels: int = 32, rationale_weight: float = 0.01, rationale_temperature: float = 0.4,
                 per_sample_minmax: bool = False, detach_cam: bool = False, scale_cam: bool = False):
        super().__init__()
        self.backbone = backbone
        self.projector = MLP(backbone.output_dim, proj_hidden_dim, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden_dim, proj_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        self.rationale = RationaleDetector(backbone.output_dim, rationale_channels, per_sample_minmax)
        self.tau = tau
        self.rationale_weight = rationale_weight
        self.rationale_temperature = rationale_temperature
        self.detach_cam = detach_cam
        self.scale_cam = scale_cam

    def online_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def target_parameters(self) -> list[nn.Parameter]:
        return list(self.target_backbone.parameters()) + list(self.target_projector.parameters())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """target <- tau * target + (1 - tau) * online, parameters only (BN statistics move by their own passes)."""
        ema_update(self.target_parameters(), self.online_parameters(), self.tau)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(global_pool(self.target_backbone(x)))

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        feat1 = self.backbone(view1)
        feat2 = self.backbone(view2)
        # The heads run in fp32 even under autocast: GradCAM's gradient on layer4, which the rationale
        # loss is fitted to, lies below fp16's range, and the heads cost little next to the backbone.
        with torch.autocast(feat1.device.type, enabled=False):
            cam_feat = feat1.float()  # feat1 itself in fp32 training
            p1 = self.predictor(self.projector(global_pool(cam_feat)))
            p2 = self.predictor(self.projector(global_pool(feat2.float())))
        with torch.no_grad():
            z1_t = self._target(view1)
            z2_t = self._target(view2)
        ssl_loss = byol_loss(p1, z2_t, p2, z1_t)

        # GradCAM of the SSL loss on view 1's layer4. The gradient is a constant (no create_graph),
        # but feat1 keeps its graph, so the rationale loss also trains the backbone through cam.
        (grad1,) = torch.autograd.grad(ssl_loss, cam_feat, retain_graph=True)
        cam = gradcam(cam_feat.detach() if self.detach_cam else cam_feat, grad1)
        if self.scale_cam:
            cam = per_image_unit(cam)
        attention = self.rationale(feat1)
        rationale_loss = rationale_kl(cam, attention, self.rationale_temperature, flatten=True)
        loss = lcr_objective(ssl_loss, rationale_loss, self.rationale_weight)
        return {"loss": loss, "ssl_loss": ssl_loss, "rationale_loss": rationale_loss, "gradcam": cam,
                "attention": attention}

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluation features, both L2-normalised: GAP of layer4, and the rationale-weighted pooling."""
        feat = self.backbone(images)
        attention = self.rationale(feat)
        return {"gap": F.normalize(global_pool(feat), dim=1), "rationale": self.rationale.pool(feat, attention),
                "attention": attention}
