"""What every method's model offers, and the LCR branch they all carry, written once.

LCR (Shu et al., CVPR 2023) adds to a self-supervised method: GradCAM of the method's own loss on view
1's layer4, a rationale detector fitted to it by a KL divergence, and rationale-weighted pooling for
evaluation. A method's model subclasses ``LCRModel``, computes its SSL loss in ``forward`` and hands
it to ``lcr_terms`` with view 1's layer4 map and the detector's attention on it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from lcr_fast.kernels import gradcam, rationale_kl
from lcr_fast.objective import lcr_objective

from .rationale import per_image_unit


def global_pool(feat: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(feat, 1).flatten(1)


class LCRModel(nn.Module, ABC):
    """The interface the trainer, the engine, the evaluation and the checkpoint code use, whatever the method.

    - ``backbone``: the ResNet trunk (``lcr_fast.models.backbone.ResNetTrunk``), returning layer4
      [B, C, h, w]; ``backbone.output_dim`` is C, the width of the evaluation features.
    - ``rationale``: the ``RationaleDetector`` on layer4, which the subclass registers where its
      parameter order (and so its optimizer state and its initial random draws) puts it.
    - ``rationale_weight``: nu, the KL's weight in the objective (``lcr_fast.objective``, which scales it
      by the pieces of a distributed step).
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

    The switches of the shared branch: ``rationale_temperature`` (the KL's t), ``flatten_kl`` (softmax
    over the flattened h*w, else over rows as the reference's MoCo), ``detach_cam`` and ``scale_cam``
    (``fixes.*``, see lcr_fast.config).
    """

    backbone: nn.Module
    rationale: nn.Module

    def __init__(self, backbone: nn.Module, rationale_weight: float, rationale_temperature: float, flatten_kl: bool,
                 detach_cam: bool, scale_cam: bool):
        super().__init__()
        self.backbone = backbone
        self.rationale_weight = rationale_weight
        self.rationale_temperature = rationale_temperature
        self.flatten_kl = flatten_kl
        self.detach_cam = detach_cam
        self.scale_cam = scale_cam

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
        """The LCR branch on view 1's layer4 map ``cam_feat``, which ``ssl_loss`` was computed from, and the
        detector's ``attention`` on it: the forward's output dict.

        GradCAM's gradient is a constant (no create_graph), but ``cam_feat`` keeps its graph, so the
        rationale loss also trains the backbone through cam (the reference's behaviour; ``detach_cam``
        stops it).
        """
        (grad,) = torch.autograd.grad(ssl_loss, cam_feat, retain_graph=True)
        cam = gradcam(cam_feat.detach() if self.detach_cam else cam_feat, grad)
        if self.scale_cam:
            cam = per_image_unit(cam)
        rationale_loss = rationale_kl(cam, attention, self.rationale_temperature, flatten=self.flatten_kl)
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
