"""Which samples a rank reads in an epoch: a pure function of (seed, epoch, rank), shared by both backends."""
from __future__ import annotations

import torch

from .folder import FolderIndex


def stream_seed(seed: int, epoch: int, shard_id: int = 0) -> int:
    """A distinct, reproducible seed for one rank's epoch (augmentation streams, shuffles)."""
    return (seed * 1_000_003 + epoch * 10_007 + shard_id) % (2**62)


def sample_seed(epoch_seed: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of a rank's epoch."""
    return (epoch_seed * 1_000_003 + position) % (2**62)


def epoch_indices(num_samples: int, batch_size: int, seed: int, epoch: int, shard_id: int = 0, num_shards: int = 1) -> list[int]:
    """This rank's sample indices for ``epoch``, in batch order.

    Global step s covers permutation slots [s*G, (s+1)*G) with G = batch_size * num_shards, and rank r
    takes the r-th block of ``batch_size`` of them. So every rank gets the same number of steps, no
    sample is read twice in an epoch, and a run on N ranks sees the same global batches as one rank
    with an N-times larger batch. The tail that cannot fill a global batch is dropped (as the
    reference's ``drop_last``) and, the permutation being new each epoch, differs between epochs.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is outside [0, {num_shards})")
    generator = torch.Generator().manual_seed(stream_seed(seed, epoch))
    perm = torch.randperm(num_samples, generator=generator)
    global_batch = batch_size * num_shards
    steps = num_samples // global_batch
    blocks = perm[: steps * global_batch].view(steps, num_shards, batch_size)
    return blocks[:, shard_id].reshape(-1).tolist()


class ShardedEpochs:
    """What both training loaders share: one rank's shard of ``index``, epoch by epoch.

    ``len()`` is the steps per epoch (equal on every rank), ``set_epoch(e, start_step)`` selects the
    epoch whose batches ``epoch_indices()`` returns and whose augmentation stream ``epoch_seed()``
    seeds; iteration then begins at batch ``start_step`` (a run resumed mid-epoch), with the same
    batches and augmentations as the uninterrupted epoch from there on.
    """

    def __init__(self, index: FolderIndex, batch_size: int, seed: int, shard_id: int, num_shards: int):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} is outside [0, {num_shards})")
        self.index = index
        self.classes = index.classes
        self.batch_size, self.seed = batch_size, seed
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch, self.start_step = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"{len(index)} training images cannot fill one batch of {batch_size} on each of {num_shards} rank(s)"
            )

    def __len__(self) -> int:
        return len(self.index) // (self.batch_size * self.num_shards)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} is outside the epoch's {len(self)} steps")
        self.epoch, self.start_step = epoch, start_step

    def epoch_indices(self) -> list[int]:
        return epoch_indices(len(self.index), self.batch_size, self.seed, self.epoch, self.shard_id, self.num_shards)

    def epoch_seed(self) -> int:
        return stream_seed(self.seed, self.epoch, self.shard_id)
