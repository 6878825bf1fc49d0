"""LCR's rationale branch as one module that any self-supervised training loop can carry.

LCR (Shu et al., CVPR 2023) adds to a self-supervised method: GradCAM of the method's own loss on the last
feature map F of view 1, a rationale detector (1x1 conv -> BN -> ReLU -> max over channels, min-max
normalised) fitted to that CAM by a KL divergence, and the detector's map as pooling weights for evaluation
features. ``RationaleBranch`` is all of it; lcr-fast's BYOL, MoCo v2 and SimSiam models hold one as their
``rationale`` and call ``terms`` in every forward, and a loop of one's own does the same (docs/your-own-loop.md).
"""
from __future__ import annotations

import torch
from torch import nn

from lcr_fast.kernels import gradcam, rationale_kl, rationale_map, rationale_pool
from lcr_fast.objective import lcr_objective


def per_image_unit(maps: torch.Tensor) -> torch.Tensor:
    """Each image's map [B, h, w] shifted and scaled to [0, 1] (all zeros where it is constant); differentiable.
    fixes.scale_cam applies it to GradCAM so that the KL's softmax sees the CAM's shape whatever the loss's
    gradient scale, and the heatmap figure to both maps for display."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    span = (flat.amax(dim=1).view(-1, 1, 1) - low).clamp(min=1e-12)
    return (maps - low) / span


class RationaleBranch(nn.Module):
    """The rationale detector on a feature map [B, C, h, w] and the loss that fits it to the SSL loss's GradCAM.

    The defaults are the reference's BYOL + LCR: ``temperature`` t = 0.4 and the KL over the flattened h*w
    (``flatten_kl``), reduction sum over the batch, ``weight`` 0.01, and the attention map's min and max
    taken over the whole batch. The other arguments are the corrected behaviours of ``fixes.*``
    (lcr_fast.config): ``per_sample_minmax`` normalises each image's map on its own, ``detach_cam`` stops
    the rationale loss from training the backbone through the CAM, ``scale_cam`` scales each image's CAM
    to [0, 1] before the KL. The reference's MoCo v2 uses ``temperature=1.0, flatten_kl=False`` (softmax
    over each row of the map).

    Its parameters are ``conv.weight`` and ``bn.*``, the names the models' checkpoints hold under
    ``rationale.``.
    """

    def __init__(self, in_channels: int, channels: int = 32, temperature: float = 0.4, weight: float = 0.01,
                 per_sample_minmax: bool = False, flatten_kl: bool = True, detach_cam: bool = False,
                 scale_cam: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.temperature = temperature
        self.weight = weight
        self.per_sample_minmax = per_sample_minmax
        self.flatten_kl = flatten_kl
        self.detach_cam = detach_cam
        self.scale_cam = scale_cam

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """The attention map A [B, h, w] in [0, 1] of the feature map ``feat``."""
        return rationale_map(self.bn(self.conv(feat)), per_sample=self.per_sample_minmax)

    def pool(self, feat: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Rationale features [B, C]: mean over h*w of feat*A, L2-normalised (the reference's evaluation feature)."""
        return rationale_pool(feat, attention)

    def terms(self, feat: torch.Tensor, ssl_loss: torch.Tensor,
              attention: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The LCR terms of one training step: ``loss`` (ssl_loss + weight * rationale_loss, what to
        back-propagate), ``ssl_loss``, ``rationale_loss`` (the KL), ``gradcam`` [B, h, w] and ``attention``
        [B, h, w].

        ``feat`` is the feature map ``ssl_loss`` was computed from (view 1's last stage), still in the
        graph. GradCAM's gradient dL/dF is taken as a constant (no create_graph), but ``feat`` keeps its
        graph, so the rationale loss also trains the backbone through the CAM (the reference's behaviour;
        ``detach_cam`` stops it). ``attention`` is this module's map of ``feat`` when the caller already
        has it (a model that must run the detector at a set point, or on a lower-precision copy of
        ``feat``); otherwise it is computed here.
        """
        if attention is None:
            attention = self(feat)
        (grad,) = torch.autograd.grad(ssl_loss, feat, retain_graph=True)
        cam = gradcam(feat.detach() if self.detach_cam else feat, grad)
        if self.scale_cam:
            cam = per_image_unit(cam)
        rationale_loss = rationale_kl(cam, attention, self.temperature, flatten=self.flatten_kl)
        loss = lcr_objective(ssl_loss, rationale_loss, self.weight)
        return {"loss": loss, "ssl_loss": ssl_loss, "rationale_loss": rationale_loss, "gradcam": cam,
                "attention": attention}
