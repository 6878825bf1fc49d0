"""The LCR rationale detector: 1x1 conv -> BN -> ReLU -> max over channels -> min-max normalised map."""
from __future__ import annotations

import torch
from torch import nn

from lcr_fast.kernels import rationale_map, rationale_pool


def per_image_unit(maps: torch.Tensor) -> torch.Tensor:
    """Each image's map [B, h, w] shifted and scaled to [0, 1] (all zeros where it is constant); differentiable.
    fixes.scale_cam applies it to GradCAM so that the KL's softmax sees the CAM's shape whatever the loss's
    gradient scale, and the heatmap figure to both maps for display."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    span = (flat.amax(dim=1).view(-1, 1, 1) - low).clamp(min=1e-12)
    return (maps - low) / span


class RationaleDetector(nn.Module):
    """Maps a layer4 feature map [B, C, h, w] to an attention map A in [0, 1] of shape [B, h, w].

    ``per_sample`` False reproduces the reference, which takes the min and max over the whole batch,
    so one image's map depends on the others in its batch.
    """

    def __init__(self, in_channels: int, channels: int = 32, per_sample: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.per_sample = per_sample

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return rationale_map(self.bn(self.conv(feat)), per_sample=self.per_sample)

    def pool(self, feat: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Rationale features: mean over h*w of feat*A, L2-normalised (the reference's evaluation feature)."""
        return rationale_pool(feat, att)
