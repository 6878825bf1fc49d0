"""Which samples a rank reads in an epoch: a pure function of (seed, epoch, rank), shared by both backends."""
from __future__ import annotations

import torch

from .folder import FolderIndex


def stream_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed for an epoch (shuffles, augmentation streams)."""
    return (seed * 1_000_003 + epoch * 10_007) % (2**62)


def sample_seed(epoch_seed: int, slot: int) -> int:
    """The augmentation seed of the sample in permutation ``slot`` of an epoch."""
    return (epoch_seed * 1_000_003 + slot) % (2**62)


def epoch_indices(num_samples: int, batch_size: int, seed: int, epoch: int, shard_id: int = 0,
                  num_shards: int = 1) -> list[int]:
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
    """What both training loaders share: one rank's shard of ``index``, epoch by epoch, in micro-batches.

    An optimizer step takes ``micro_batches`` batches of ``batch_size`` on each rank (gradient
    accumulation). ``len()`` counts micro-batches per epoch (equal on every rank); ``set_epoch(e,
    start)`` selects the epoch and the micro-batch iteration begins at (a run resumed mid-epoch).

    Rank r's micro-batch m of step s holds permutation slots [s*G + (r*A + m)*b, ... + b) (G the global
    batch, A the micro-batches, b their size), and every augmentation is drawn from its slot. So the
    data of a run depend on the global batch and the micro-batch size only: 2 ranks without
    accumulation read exactly what 1 rank accumulating 2 micro-batches reads, which is what lets a
    run move between numbers of ranks and stay exact.
    """

    def __init__(self, index: FolderIndex, *, batch_size: int, seed: int, shard_id: int, num_shards: int,
                 micro_batches: int = 1):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} is outside [0, {num_shards})")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        self.index = index
        self.classes = index.classes
        self.batch_size, self.seed, self.micro_batches = batch_size, seed, micro_batches
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch, self.start_step = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"{len(index)} training images cannot fill one step of {micro_batches} batch(es) of {batch_size} "
                f"on each of {num_shards} rank(s)"
            )

    @property
    def step_batch(self) -> int:
        """Samples this rank reads per optimizer step."""
        return self.batch_size * self.micro_batches

    def __len__(self) -> int:
        return len(self.index) // (self.step_batch * self.num_shards) * self.micro_batches

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """``start_step`` counts micro-batches."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} is outside the epoch's {len(self)} micro-batches")
        self.epoch, self.start_step = epoch, start_step

    def epoch_indices(self) -> list[int]:
        return epoch_indices(len(self.index), self.step_batch, self.seed, self.epoch, self.shard_id, self.num_shards)

    def epoch_slots(self) -> list[int]:
        """The permutation slot of each entry of ``epoch_indices()``: the same for a sample whatever the
        number of ranks, as long as the global batch is."""
        step_batch, global_batch = self.step_batch, self.step_batch * self.num_shards
        first = self.shard_id * step_batch
        return [p // step_batch * global_batch + first + p % step_batch for p in range(len(self) * self.batch_size)]

    def epoch_seed(self) -> int:
        return stream_seed(self.seed, self.epoch)
