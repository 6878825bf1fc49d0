"""Shuffle BN across two gloo ranks: keys equal a direct per-rank computation on the shuffled sub-batches,
and both ranks end the step with the same queue."""
import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import free_port, tiny_config

WORLD, B, H, W = 2, 4, 48, 80  # B images per rank

pytestmark = pytest.mark.slow


def _config():
    return tiny_config(model={"name": "moco", "backbone": "resnet18", "maxpool": True, "pretrained": "none",
                              "moco_dim": 16, "moco_k": 24, "rationale_channels": 8},
                       train={"batch_size": WORLD * B, "warmup_epochs": 0})


def _keys(key_backbone, key_projector, x):
    return F.normalize(key_projector(key_backbone(x).mean((2, 3))), dim=1)


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        from lcr_fast.models import build_model

        torch.manual_seed(0)  # the same model on both ranks (DeepSpeed's broadcast, in training)
        model = build_model(_config()).train()
        twin = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        xq_all = torch.randn(WORLD * B, 3, H, W, generator=g)
        xk_all = torch.randn(WORLD * B, 3, H, W, generator=g)
        mine = slice(rank * B, (rank + 1) * B)

        torch.manual_seed(100 + rank)  # each rank draws a permutation; rank 0's is the one used
        out = model(xq_all[mine], xk_all[mine])

        # Direct computation: rank r's key encoder (its own BN) runs on slice r of the shuffled global batch.
        perm = torch.randperm(WORLD * B, generator=torch.Generator().manual_seed(100))
        shuffled, encoders = [], []
        with torch.no_grad():
            for r in range(WORLD):
                enc = copy.deepcopy(twin.key_backbone), copy.deepcopy(twin.key_projector)
                shuffled.append(_keys(*enc, xk_all[perm.view(WORLD, -1)[r]]))
                encoders.append(enc)
        k_all = torch.cat(shuffled)[torch.argsort(perm)]
        torch.testing.assert_close(model.queue[:, :WORLD * B], k_all.T, rtol=1e-5, atol=1e-6)
        assert int(model.queue_ptr) == WORLD * B
        torch.testing.assert_close(model.queue[:, WORLD * B:], twin.queue[:, WORLD * B:], rtol=0, atol=0)
        for (name, got), want in zip(model.key_backbone.named_buffers(), encoders[rank][0].buffers()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: key BN {name}")

        # This rank's loss uses its own images' keys against the queue as it was before the step.
        f = twin.backbone(xq_all[mine])
        q = F.normalize(twin.projector(f.mean((2, 3))), dim=1)
        k = k_all[mine]
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ twin.queue], dim=1) / 0.2
        expected = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
        torch.testing.assert_close(out["ssl_loss"], expected, rtol=1e-5, atol=1e-6)

        # Identical queues on both ranks.
        queues = [torch.empty_like(model.queue) for _ in range(WORLD)]
        dist.all_gather(queues, model.queue)
        assert torch.equal(queues[0], queues[1])

        # broadcast_state makes differently initialised queues rank 0's.
        with torch.no_grad():
            model.queue.normal_()
            model.queue_ptr.fill_(rank)
        model.broadcast_state()
        dist.all_gather(queues, model.queue)
        assert torch.equal(queues[0], queues[1]) and int(model.queue_ptr) == 0
    finally:
        dist.destroy_process_group()


def test_shuffled_keys_equal_direct_per_rank_keys_and_queues_agree():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
