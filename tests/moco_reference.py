"""A plain, independent re-implementation of the reference MoCo v2 + LCR step (GANPerf/LCR ``moco/builder.py``
and ``main_moco.py``'s ``train``), the oracle of tests/test_moco.py. Nothing of lcr_fast is used.

It keeps the reference's module names (so its ``state_dict()`` has the reference's keys), its unused max
branch (computed and enqueued, as there), its single-process batch shuffle (a CPU ``randperm``) and its
order of operations. Sizes are parameters so that a ResNet-18 at a few dozen pixels can stand in for
ResNet-50 at 224: the reference's ``AvgPool2d(7)`` is the mean over layer4, written here as such.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm


class RefResNet(tvm.ResNet):
    """``resnet_output.ResNet``: the standard torchvision network returning (fc(x), x, featmap)."""

    def __init__(self, arch: str = "resnet18"):
        block, layers = {"resnet50": (tvm.resnet.Bottleneck, [3, 4, 6, 3]),
                         "resnet18": (tvm.resnet.BasicBlock, [2, 2, 2, 2])}[arch]
        super().__init__(block, layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        featmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(featmap), 1)
        return self.fc(x), x, featmap


class RefMoCo(nn.Module):
    def __init__(self, arch="resnet18", dim=16, K=24, m=0.999, T=0.2, mlp=True, channels=8):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = RefResNet(arch), RefResNet(arch)
        width = self.encoder_q.fc.in_features
        self.encoder_q.fc = nn.Linear(width, dim)
        self.encoder_k.fc = nn.Linear(width, dim)
        if mlp:
            self.encoder_q.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.encoder_k.fc)
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data.copy_(pq.data)
            pk.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_max", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr_max", torch.zeros(1, dtype=torch.long))
        self.conv16 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn16 = nn.BatchNorm2d(channels)
        self.conv16_2 = nn.Conv2d(channels, 1, 1, bias=False)
        self.bn16_2 = nn.BatchNorm2d(1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(width, dim)
        self.qmax = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.fc)
        self.kmax = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.fc)

    @torch.no_grad()
    def _momentum(self):
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
        for pq, pk in zip(self.qmax.parameters(), self.kmax.parameters()):
            pk.data = pk.data * self.m + pq.data * (1.0 - self.m)

    @torch.no_grad()
    def _enqueue(self, queue, ptr_buf, keys):
        ptr = int(ptr_buf)
        assert self.K % keys.shape[0] == 0
        queue[:, ptr:ptr + keys.shape[0]] = keys.T
        ptr_buf[0] = (ptr + keys.shape[0]) % self.K

    def _max_mask(self, featmap):
        a = self.relu(self.bn16(self.conv16(featmap)))
        a, _ = torch.max(a, dim=1)
        a = a - torch.min(a)
        att = a / (1e-7 + torch.max(a))
        pooled = (featmap * att[:, None]).mean(dim=(2, 3))
        return F.normalize(pooled, dim=1), att

    def forward(self, im_q, im_k):
        q, _, featmap = self.encoder_q(im_q)
        q = F.normalize(q, dim=1)
        q_max, att_max = self._max_mask(featmap)
        q_max_proj = F.normalize(self.qmax(q_max), dim=1)
        with torch.no_grad():
            self._momentum()
            idx_shuffle = torch.randperm(im_k.shape[0])  # one process: the gather is the batch itself
            idx_unshuffle = torch.argsort(idx_shuffle)
            k, _, featmap_k = self.encoder_k(im_k[idx_shuffle])
            k = F.normalize(k, dim=1)
            k_max, _ = self._max_mask(featmap_k)
            k_max_proj = F.normalize(self.kmax(k_max), dim=1)
            k = k[idx_unshuffle]
            k_max_proj = k_max_proj[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        l_pos_max = torch.einsum("nc,nc->n", q_max_proj, k_max_proj).unsqueeze(-1)
        l_neg_max = torch.einsum("nc,ck->nk", q_max_proj, self.queue_max.clone().detach())
        logits_max = torch.cat([l_pos_max, l_neg_max], dim=1) / self.T
        self._enqueue(self.queue, self.queue_ptr, k)
        self._enqueue(self.queue_max, self.queue_ptr_max, k_max_proj)
        self.relu(self.bn16(self.conv16(featmap)))  # featcov16: returned, unused by the loss
        ce = F.cross_entropy(logits, labels)
        grad = torch.autograd.grad(ce, featmap, grad_outputs=torch.ones_like(ce), retain_graph=True,
                                   allow_unused=True)[0]
        gradcam = torch.relu((featmap * grad).sum(dim=1))
        return logits, labels, logits_max, att_max, gradcam, k


def reference_step(model: RefMoCo, optimizer, im_q, im_k, nu: float = 0.01) -> dict:
    """One iteration of ``main_moco.py``'s ``train``: CE + nu * KL over the last axis, reduction sum, SGD step."""
    logits, labels, _, att, cam, k = model(im_q, im_k)
    ce = F.cross_entropy(logits, labels)
    kl = F.kl_div(att.softmax(dim=-1).log(), cam.softmax(dim=-1), reduction="sum")
    total = ce + nu * kl
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return {"loss": total.detach(), "ssl_loss": ce.detach(), "rationale_loss": kl.detach(), "gradcam": cam.detach(),
            "attention": att.detach(), "keys": k}


def reference_file(path, model: RefMoCo, optimizer=None, epoch: int = 3, arch: str = "resnet18") -> None:
    """``main_moco.py``'s ``save_checkpoint`` of a DDP module: ``module.``-prefixed keys."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    torch.save({"epoch": epoch, "arch": arch, "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, path)
