"""A plain, independent re-implementation of the SimSiam + LCR step, the oracle of tests/test_simsiam.py.
Nothing of lcr_fast is used.

Written from the formulas: SimSiam as facebookresearch/simsiam describes it (``builder.py``: a
torchvision ResNet with ``zero_init_residual``, its fc replaced by the 3-layer projector whose last
Linear's bias is frozen, a 2-layer predictor, the loss -(cos(p1, z2) + cos(p2, z1)) / 2 with z
detached; ``main_simsiam.py``: SGD over the encoder and the predictor, ``--fix-pred-lr``, per-epoch
cosine ``init_lr * 0.5 * (1 + cos(pi * epoch / epochs))``), and LCR's branch as the reference's BYOL
``main.py`` computes it (GradCAM of the loss on view 1's layer4, ``conv16``/``bn16``, batch-wide
min-max, KL of the flattened maps at t with reduction sum, weight nu). Module names follow builder.py
(``encoder.fc.*``) and LCR (``conv16``, ``bn16``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm


class RefSimSiam(nn.Module):
    def __init__(self, arch: str = "resnet18", dim: int = 2048, pred_dim: int = 512, channels: int = 32):
        super().__init__()
        self.encoder = getattr(tvm, arch)(num_classes=dim, zero_init_residual=True)
        width = self.encoder.fc.weight.shape[1]
        hidden = [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        self.encoder.fc = nn.Sequential(*hidden, nn.Linear(width, width, bias=False), nn.BatchNorm1d(width),
                                        nn.ReLU(inplace=True), self.encoder.fc, nn.BatchNorm1d(dim, affine=False))
        self.encoder.fc[6].bias.requires_grad = False
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))
        self.conv16 = nn.Conv2d(width, channels, kernel_size=1, bias=False)
        self.bn16 = nn.BatchNorm2d(channels)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.encoder
        feat = e.layer4(e.layer3(e.layer2(e.layer1(e.maxpool(e.relu(e.bn1(e.conv1(x))))))))
        return feat, e.fc(torch.flatten(e.avgpool(feat), 1))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        feat1, z1 = self._encode(x1)
        _, z2 = self._encode(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        cos = nn.CosineSimilarity(dim=1)
        loss = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5
        grad = torch.autograd.grad(loss, feat1, retain_graph=True)[0]
        gradcam = torch.relu((feat1 * grad).sum(dim=1))
        att = torch.relu(self.bn16(self.conv16(feat1))).max(dim=1)[0]
        att = att - att.min()
        att = att / (1e-7 + att.max())
        return {"loss": loss, "gradcam": gradcam, "attmap": att}


def total_loss(out: dict[str, torch.Tensor], t: float = 0.4, weight: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    cam = out["gradcam"].reshape(out["gradcam"].shape[0], -1) / t
    att = out["attmap"].reshape(out["attmap"].shape[0], -1) / t
    kl = F.kl_div(att.softmax(dim=-1).log(), cam.softmax(dim=-1), reduction="sum")
    return out["loss"] + weight * kl, kl


def sgd(model: RefSimSiam, init_lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """main_simsiam.py's optimizer with --fix-pred-lr; LCR's detector trains with the encoder."""
    encoder = list(model.encoder.parameters()) + list(model.conv16.parameters()) + list(model.bn16.parameters())
    groups = [{"params": encoder, "fix_lr": False}, {"params": list(model.predictor.parameters()), "fix_lr": True}]
    return torch.optim.SGD(groups, init_lr, momentum=momentum, weight_decay=weight_decay)


def adjust_learning_rate(optimizer: torch.optim.Optimizer, init_lr: float, epoch: int, epochs: int) -> None:
    cur_lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))
    for group in optimizer.param_groups:
        group["lr"] = init_lr if group["fix_lr"] else cur_lr


def train_step(model: RefSimSiam, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor) -> dict:
    out = model(x1, x2)
    total, kl = total_loss(out)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return {"loss": total.detach(), "ssl_loss": out["loss"].detach(), "rationale_loss": kl.detach(),
            "gradcam": out["gradcam"].detach(), "attention": out["attmap"].detach()}


def reference_name(ours: str) -> str:
    """The oracle's name of one of our state-dict keys."""
    for mine, theirs in (("backbone.", "encoder."), ("projector.", "encoder.fc."), ("predictor.", "predictor."),
                         ("rationale.conv.", "conv16."), ("rationale.bn.", "bn16.")):
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise KeyError(ours)
