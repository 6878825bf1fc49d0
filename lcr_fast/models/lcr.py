"""What every method's model offers, and the LCR branch they all carry, written once.

LCR (Shu et al., CVPR 2023) adds to a self-supervised method: GradCAM of the method's own loss on view
1's layer4, a rationale detector fitted to it by a KL divergence, and rationale-weighted pooling for
evaluation. That branch is ``lcr_fast.lcr.RationaleBranch``; a method's model subclasses ``LCRModel``,
registers one as ``rationale``, computes its SSL loss in ``forward`` and hands it to ``lcr_terms`` with
view 1's layer4 map and the branch's attention on it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from lcr_fast.lcr import RationaleBranch


def global_pool(feat: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(feat, 1).flatten(1)


class LCRModel(nn.Module, ABC):
    """The interface the trainer, the engine, the evaluation and the checkpoint code use, whatever the method.

    - ``backbone``: the ResNet trunk (``lcr_fast.models.backbone.ResNetTrunk``), returning layer4
      [B, C, h, w]; ``backbone.output_dim`` is C, the width of the evaluation features.
    - ``rationale``: the ``RationaleBranch`` on layer4 (detector, KL settings and ``fixes.*`` switches),
      which the subclass registers where its parameter order (and so its optimizer state and its initial
      random draws) puts it.
    - ``rationale_weight``: nu, the KL's weight in the objective, the branch's ``weight``
      (``lcr_fast.objective`` scales it by the pieces of a distributed step).
    - ``forward(view1, view2)`` in train mode: a dict of ``loss`` (total), ``ssl_loss``, ``rationale_loss``,
      ``gradcam`` [B, h, w] and ``attention`` [B, h, w] (``lcr_terms`` makes the last four). It changes no
      parameter; buffers may change (BatchNorm statistics, MoCo's queue).
    - ``momentum_update()``: the EMA step of a momentum encoder, which the engine calls once per optimizer
      step right before that step's first forward (the reference's order); nothing where there is none.
    - ``broadcast_state(src)``: make the state that DeepSpeed does not broadcast (it broadcasts parameters,
      not buffers) equal on every rank, once after building; nothing where there is none.
    - ``extract(images)`` in eval mode: ``gap`` and ``rationale`` features [B, C], both L2-normalised, and
      ``attention``.
    - ``from_config(config)``: the model a config describes (``lcr_fast.models.build_model`` calls it).
    """

    backbone: nn.Module
    rationale: RationaleBranch

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @property
    def rationale_weight(self) -> float:
        return self.rationale.weight

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> LCRModel:
        """The model ``config`` describes (its ``model`` and ``fixes`` sections), built by keyword."""

    @abstractmethod
    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training step's outputs; ends with ``return self.lcr_terms(...)``."""

    @torch.no_grad()
    def momentum_update(self) -> None:
        """No momentum encoder: nothing to update."""

    @torch.no_grad()
    def broadcast_state(self, src: int = 0) -> None:
        """No state beside parameters that must agree across ranks."""

    def lcr_terms(self, ssl_loss: torch.Tensor, cam_feat: torch.Tensor,
                  attention: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forward's output dict: the LCR branch on view 1's layer4 map ``cam_feat``, which ``ssl_loss``
        was computed from, and the branch's ``attention`` on it (``RationaleBranch.terms``)."""
        return self.rationale.terms(cam_feat, ssl_loss, attention)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluation features, both L2-normalised: GAP of layer4, and the rationale-weighted pooling."""
        feat = self.backbone(images)
        attention = self.rationale(feat)
        return {"gap": F.normalize(global_pool(feat), dim=1), "rationale": self.rationale.pool(feat, attention),
                "attention": attention}
