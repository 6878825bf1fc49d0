"""MoCo v2 with the LCR rationale branch, computing what the reference's ``moco/builder.py`` + ``main_moco.py`` compute.

Symbols as in the MoCo paper: queue size K, key-encoder momentum m, temperature T. The reference's
second "max" branch (``qmax``/``kmax``, ``queue_max``, ``conv16_2``/``bn16_2``, ``fc``) never enters
its loss and is not computed here; ``lcr_fast.compat`` writes its keys when exporting. What that
branch does to real state is kept: it runs the rationale detector's conv+BN on the key feature map
in train mode, and the reference runs it on the query map twice, so ``rationale.bn``'s running
statistics move three times per step (query, key, query), as here.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lcr_fast.kernels import ema_update, infonce_queue
from lcr_fast.kernels.dispatch import memory_format_of
from lcr_fast.lcr import RationaleBranch

from .backbone import build_backbone
from .lcr import LCRModel, global_pool


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order (no gradient); ``x`` itself in one process."""
    world, _ = _world()
    if world == 1:
        return x
    x_c = x.contiguous()
    parts = [torch.empty_like(x_c) for _ in range(world)]
    dist.all_gather(parts, x_c)
    return torch.cat(parts).contiguous(memory_format=memory_format_of(x))  # channels_last stays channels_last


def projection_head(in_dim: int, dim: int, mlp: bool) -> nn.Module:
    """The reference's ``fc``: Linear(in, in) -> ReLU -> Linear(in, dim) (``--mlp``), or Linear(in, dim)."""
    if mlp:
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, dim))
    return nn.Linear(in_dim, dim)


class MoCo(LCRModel):
    """Query encoder (backbone, projector), momentum key encoder, queue of keys, rationale detector.

    ``forward`` changes no parameter; besides BatchNorm statistics its one state change is the
    enqueue of this step's keys (all ranks'), as in the reference. The key encoder's EMA step is
    ``momentum_update()``, which ``lcr_fast.loop.train_step`` calls once per optimizer step right
    before the forward (the reference runs it inside forward, before the keys: the same result).
    The KL is the reference's: no temperature, softmax over rows of the map unless ``flatten_kl``.
    """

    def __init__(self, backbone: nn.Module, dim: int = 256, K: int = 65536, m: float = 0.999, T: float = 0.2,
                 mlp: bool = True, rationale_channels: int = 32, rationale_weight: float = 0.01,
                 per_sample_minmax: bool = False, flatten_kl: bool = False, detach_cam: bool = False,
                 scale_cam: bool = False):
        super().__init__(backbone)
        self.K, self.m, self.T = K, m, T
        self.projector = projection_head(backbone.output_dim, dim, mlp)
        self.key_backbone = copy.deepcopy(backbone)
        self.key_projector = copy.deepcopy(self.projector)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.rationale = RationaleBranch(backbone.output_dim, rationale_channels, temperature=1.0,
                                         weight=rationale_weight, per_sample_minmax=per_sample_minmax,
                                         flatten_kl=flatten_kl, detach_cam=detach_cam, scale_cam=scale_cam)
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # The reference's unused max-branch tensors when this model was read from one of its files
        # (lcr_fast.compat); plain CPU tensors outside the state dict, only for exporting them back.
        self.reference_extras: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, config) -> MoCo:
        m, fixes = config.model, config.fixes
        return cls(build_backbone(m.backbone, m.maxpool, m.pretrained), dim=m.moco_dim, K=m.moco_k, m=m.moco_m,
                   T=m.moco_t, mlp=m.moco_mlp, rationale_channels=m.rationale_channels,
                   rationale_weight=m.rationale_weight, per_sample_minmax=fixes.per_sample_minmax,
                   flatten_kl=fixes.flatten_kl, detach_cam=fixes.detach_cam, scale_cam=fixes.scale_cam)

    def query_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def key_parameters(self) -> list[nn.Parameter]:
        return list(self.key_backbone.parameters()) + list(self.key_projector.parameters())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query, parameters only (the reference's rounding, bit for bit)."""
        ema_update(self.key_parameters(), self.query_parameters(), self.m)

    @torch.no_grad()
    def broadcast_state(self, src: int = 0) -> None:
        """Give every rank rank ``src``'s queue and pointer. Each rank draws its initial queue from its own
        seed and DeepSpeed broadcasts parameters only (the reference's DDP broadcasts buffers)."""
        if _world()[0] > 1:
            dist.broadcast(self.queue, src)
            dist.broadcast(self.queue_ptr, src)

    @torch.no_grad()
    def _track_rationale_bn(self, feat: torch.Tensor) -> None:
        """The reference's extra passes of conv16/bn16 (max branch, ``featcov16``): only BN statistics change."""
        self.rationale.bn(self.rationale.conv(feat))

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys of this rank's images and of all ranks' (rank order), with shuffle BN.

        As the reference: gather every rank's key images, draw a permutation from the CPU generator
        (every rank draws; rank 0's is broadcast), run each rank's slice of the shuffled global batch,
        gather and unshuffle. In one process the gather is the batch itself and the permutation only
        reorders it (BN statistics are order-free up to rounding), but it is drawn and applied all the
        same, so the global RNG advances as the reference's does.
        """
        world, rank = _world()
        x_all = concat_all_gather(im_k)
        # Non-blocking: a blocking host-to-device copy waits for the stream, that is for the whole step so far.
        perm = torch.randperm(x_all.shape[0]).to(im_k.device, non_blocking=True)
        if world > 1:
            dist.broadcast(perm, src=0)
        feat = self.key_backbone(x_all[perm.view(world, -1)[rank]])
        self._track_rationale_bn(feat)  # the reference's max_mask on the key map
        k_shuffled = F.normalize(self.key_projector(global_pool(feat)), dim=1)
        k_all = concat_all_gather(k_shuffled)[torch.argsort(perm)]
        return k_all.view(world, -1, k_all.shape[1])[rank], k_all

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` columns of the queue; the pointer stays on the device (no host sync)."""
        n = keys.shape[0]
        if self.K % n:  # config.validate checks the training batch; this catches other callers
            raise ValueError(f"the MoCo queue size K={self.K} is not a multiple of the {n} keys to enqueue")
        cols = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % self.K
        self.queue.index_copy_(1, cols, keys.T.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> dict[str, torch.Tensor]:
        feat_q = self.backbone(im_q)
        # The head runs in fp32 even under autocast: GradCAM's gradient on layer4, which the rationale
        # loss is fitted to, lies below fp16's range, and the head costs little next to the backbone.
        with torch.autocast(feat_q.device.type, enabled=False):
            cam_feat = feat_q.float()  # feat_q itself in fp32 training
            q = F.normalize(self.projector(global_pool(cam_feat)), dim=1)
        attention = self.rationale(feat_q)  # rationale.bn statistics: query (1st of 3)
        with torch.no_grad():
            k, k_all = self._keys(im_k)  # key map (2nd)
            self._track_rationale_bn(feat_q)  # query again (3rd): the reference's featcov16
        # The loss reads the queue as it was before this step's keys; the clone keeps autograd's saved
        # copy intact when the enqueue below writes the buffer in place.
        ssl_loss = infonce_queue(q, k, self.queue.clone(), self.T)
        self._enqueue(k_all)

        # GradCAM of the InfoNCE loss on the query's layer4, and the reference's KL (see the class).
        return self.lcr_terms(ssl_loss, cam_feat, attention)
