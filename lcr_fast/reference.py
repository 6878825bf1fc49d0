"""A plain re-implementation of the reference's BYOL + LCR training step (GANPerf/LCR).

It is the baseline of the benchmarks (fp32 eager, what the reference runs) and the oracle of the
faithfulness tests: it keeps the reference's module structure, so its ``state_dict()`` has the
reference's key names, and its order of operations (EMA at the start of forward, GradCAM, batch-wide
min-max, KL on softmax().log(), LARS whose momentum is never stored, scheduler stepped after the
optimizer). Nothing here is used by the trainer itself.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm


class ReferenceResNet(tvm.ResNet):
    """torchvision's ResNet with fc removed; ``maxpool=False`` skips the stem max-pool as ``cub_resnet_1`` does."""

    def __init__(self, arch: str = "resnet50", maxpool: bool = False):
        block, layers = {"resnet50": (tvm.resnet.Bottleneck, [3, 4, 6, 3]),
                         "resnet18": (tvm.resnet.BasicBlock, [2, 2, 2, 2])}[arch]
        super().__init__(block, layers)
        self.output_dim = self.fc.in_features
        self.fc = nn.Identity()
        self.use_maxpool = maxpool

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.use_maxpool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class ReferenceMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 4096, out: int = 256):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1),
                                    nn.ReLU(inplace=True))
        self.layer2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))


def _negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


class ReferenceBYOL(nn.Module):
    def __init__(self, backbone: ReferenceResNet, hidden: int = 4096, proj: int = 256, channels: int = 32):
        super().__init__()
        self.backbone = backbone
        self.projector = ReferenceMLP(backbone.output_dim, hidden, proj)
        self.online_encoder = nn.Sequential(self.backbone, self.projector)
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.online_predictor = ReferenceMLP(proj, hidden, proj)
        self.conv16 = nn.Conv2d(backbone.output_dim, channels, kernel_size=1, bias=False)
        self.bn16 = nn.BatchNorm2d(channels)

    @torch.no_grad()
    def update_moving_average(self, tau: float = 0.996) -> None:
        for online, target in zip(self.online_encoder.parameters(), self.target_encoder.parameters()):
            target.data = tau * target.data + (1 - tau) * online.data

    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone.features(x)
        return feat, self.projector(torch.flatten(self.backbone.avgpool(feat), 1))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        feat1, z1 = self._online(x1)
        _, z2 = self._online(x2)
        p1, p2 = self.online_predictor(z1), self.online_predictor(z2)
        with torch.no_grad():
            self.update_moving_average()
            z1_t = self.target_encoder(x1)
            z2_t = self.target_encoder(x2)
        loss = _negative_cosine(p1, z2_t) / 2 + _negative_cosine(p2, z1_t) / 2
        grad = torch.autograd.grad(loss, feat1, grad_outputs=torch.ones_like(loss), retain_graph=True)[0]
        gradcam = torch.relu((feat1 * grad).sum(dim=1))
        att = torch.relu(self.bn16(self.conv16(feat1)))
        att, _ = torch.max(att, dim=1)
        att = att - torch.min(att)
        att = att / (1e-7 + torch.max(att))
        return {"loss": loss, "attmap": att, "gradcam": gradcam}


def reference_total_loss(out: dict[str, torch.Tensor], t: float = 0.4,
                         weight: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``main.py``'s loss: BYOL loss + weight * KL(softmax(cam/t) || softmax(att/t)), reduction sum."""
    cam = (out["gradcam"].reshape(out["gradcam"].shape[0], -1) / t).float()
    att = (out["attmap"].reshape(out["attmap"].shape[0], -1) / t).float()
    kl = F.kl_div(att.softmax(dim=-1).log(), cam.softmax(dim=-1), reduction="sum")
    return out["loss"] + weight * kl, kl


class ReferenceLARS(torch.optim.Optimizer):
    """``lars_simclr`` as the reference runs it: the velocity it reads is never written, so momentum is 0."""

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1.5e-6,
                 trust_coef: float = 1e-3):
        base, exclude = [], []
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                exclude.extend(module.parameters(recurse=False))
            else:
                for name, param in module.named_parameters(recurse=False):
                    (exclude if name == "bias" else base).append(param)
        super().__init__([{"name": "base", "params": base}, {"name": "exclude", "params": exclude}],
                         dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                velocity = self.state[p].get("velocity", 0)
                trust = 1.0
                if group["name"] != "exclude":
                    p.grad.data += group["weight_decay"] * p.data
                    w, g = torch.norm(p.data, p=2), torch.norm(p.grad.data, p=2)
                    trust = group["trust_coef"] * w / g if w > 0 and g > 0 else 1.0
                p.data = p.data - (group["momentum"] * velocity + group["lr"] * trust * p.grad.data)


class ReferenceSchedule:
    """``LR_Scheduler``: warmup linspace then cosine, stepped after each optimizer step."""

    def __init__(self, optimizer, warmup_epochs, warmup_lr, num_epochs, base_lr, final_lr, iter_per_epoch):
        warmup = np.linspace(warmup_lr, base_lr, iter_per_epoch * warmup_epochs)
        decay = iter_per_epoch * (num_epochs - warmup_epochs)
        cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * np.arange(decay) / decay))
        self.lr_schedule = np.concatenate((warmup, cosine))
        self.optimizer = optimizer
        self.iter = 0

    def step(self) -> float:
        lr = self.lr_schedule[self.iter]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.iter += 1
        return lr


def reference_train_step(model: ReferenceBYOL, optimizer, scheduler: ReferenceSchedule, x1: torch.Tensor,
                         x2: torch.Tensor) -> dict:
    """One iteration of ``main.py``'s loop."""
    model.zero_grad()
    out = model(x1, x2)
    total, kl = reference_total_loss(out)
    total.backward()
    optimizer.step()
    scheduler.step()
    return {"loss": total.detach(), "ssl_loss": out["loss"].detach(), "rationale_loss": kl.detach(),
            "gradcam": out["gradcam"].detach(), "attention": out["attmap"].detach()}
