"""SimSiam with the LCR rationale branch, computing what facebookresearch/simsiam's ``simsiam/builder.py``
+ ``main_simsiam.py`` compute, with LCR's branch as the reference puts it on BYOL.

Symbols as in the SimSiam paper: projector output z (``dim``), predictor output p, predictor hidden
width ``pred_dim``. The projector and predictor are ``nn.Sequential``s with builder.py's layer order,
so their parameter names (``projector.6.weight``, ``predictor.3.bias``) index the same layers as its
``encoder.fc.*`` and ``predictor.*``.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from lcr_fast.kernels import byol_loss
from lcr_fast.lcr import RationaleBranch

from .backbone import ResNetTrunk, both_views, load_pretrained, resolve_arch
from .lcr import LCRModel, global_pool


def zero_init_residual(trunk: nn.Module) -> None:
    """The last BatchNorm of every residual block starts at weight 0, so each block starts as the identity
    (torchvision's ``zero_init_residual=True``, which builder.py asks for)."""
    for block in trunk.modules():
        if isinstance(block, Bottleneck):
            nn.init.zeros_(block.bn3.weight)
        elif isinstance(block, BasicBlock):
            nn.init.zeros_(block.bn2.weight)


def projection_head(width: int, dim: int) -> nn.Sequential:
    """(Linear(width, width, no bias) -> BN -> ReLU) twice, Linear(width, dim) -> BatchNorm1d(dim, affine=False).
    The last Linear's bias is frozen: the BN after it would cancel it (builder.py's ``requires_grad = False``)."""
    head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, dim), nn.BatchNorm1d(dim, affine=False))
    head[6].bias.requires_grad_(False)
    return head


def prediction_head(dim: int, pred_dim: int) -> nn.Sequential:
    """Linear(dim, pred_dim, no bias) -> BN -> ReLU -> Linear(pred_dim, dim)."""
    return nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                         nn.Linear(pred_dim, dim))


class SimSiam(LCRModel):
    """Encoder (backbone, projector), predictor, rationale detector; no momentum encoder.

    Loss -(cos(p1, z2) + cos(p2, z1)) / 2 with z detached (the stop-gradient). The LCR branch is BYOL's:
    GradCAM of that loss on view 1's layer4, the KL over the flattened h*w at ``rationale_temperature``.
    """

    def __init__(self, backbone: nn.Module, dim: int = 2048, pred_dim: int = 512, rationale_channels: int = 32,
                 rationale_weight: float = 0.01, rationale_temperature: float = 0.4, per_sample_minmax: bool = False,
                 detach_cam: bool = False, scale_cam: bool = False):
        super().__init__(backbone)
        self.projector = projection_head(backbone.output_dim, dim)
        self.predictor = prediction_head(dim, pred_dim)
        self.rationale = RationaleBranch(backbone.output_dim, rationale_channels, temperature=rationale_temperature,
                                         weight=rationale_weight, per_sample_minmax=per_sample_minmax,
                                         detach_cam=detach_cam, scale_cam=scale_cam)

    @classmethod
    def from_config(cls, config) -> SimSiam:
        m, fixes = config.model, config.fixes
        arch, maxpool = resolve_arch(m.backbone, m.maxpool)
        backbone = ResNetTrunk(arch, maxpool)
        zero_init_residual(backbone)  # before the weights load: ImageNet weights replace it
        load_pretrained(backbone, arch, m.pretrained)
        return cls(backbone, dim=m.simsiam_dim, pred_dim=m.simsiam_pred_dim, rationale_channels=m.rationale_channels,
                   rationale_weight=m.rationale_weight, rationale_temperature=m.rationale_temperature,
                   per_sample_minmax=fixes.per_sample_minmax, detach_cam=fixes.detach_cam, scale_cam=fixes.scale_cam)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        feat1, feat2 = both_views(self.backbone, view1, view2)
        # The heads run in fp32 even under autocast, as BYOL's: GradCAM's gradient on layer4 lies below fp16's range.
        with torch.autocast(feat1.device.type, enabled=False):
            cam_feat = feat1.float()  # feat1 itself in fp32 training
            z1 = self.projector(global_pool(cam_feat))
            z2 = self.projector(global_pool(feat2.float()))
            p1, p2 = self.predictor(z1), self.predictor(z2)
        # D(p1, z2) / 2 + D(p2, z1) / 2 with D = -mean cos(p, stopgrad(z)): SimSiam's loss is BYOL's, with the
        # encoder's own z in place of the target's.
        ssl_loss = byol_loss(p1, z2.detach(), p2, z1.detach())
        return self.lcr_terms(ssl_loss, cam_feat, self.rationale(feat1))
