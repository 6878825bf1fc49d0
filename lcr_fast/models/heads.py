"""BYOL's projector/predictor MLP, with the reference's submodule names (layer1 = Linear, BN, ReLU; layer2)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.batch_norm_act import batch_norm_per_view


class MLP(nn.Module):
    """Linear(d, hidden) -> BatchNorm1d(hidden, eps 1e-5, momentum 0.1) -> ReLU -> Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=0.1),
                                    nn.ReLU(inplace=True))
        self.layer2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        """``x`` holds ``views`` equal batches, one after the other: the linear layers take them as one (each row's
        numbers are its own), BatchNorm each batch on its own and in order, as one call per view would."""
        linear, norm, relu = self.layer1
        return self.layer2(relu(batch_norm_per_view(norm, linear(x), views)))
