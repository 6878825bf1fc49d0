"""The torchvision/PIL data path: the reference's own pipeline, and the fallback where DALI is missing."""
from __future__ import annotations

import gc
import warnings
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .folder import FolderIndex
from .sharding import ShardedEpochs, sample_seed
from .transforms import eval_transform, two_view_transforms


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def collect_before_fork(num_workers: int) -> None:
    """Free unreachable objects before worker processes fork. A forked worker inherits the parent's
    garbage, and a DALI pipeline collected there (one a fallback or an earlier loader left in a reference
    cycle) shuts down threads that exist only in the parent and crashes the worker."""
    if num_workers > 0:
        gc.collect()


class FolderDataset(Dataset):
    """Images of a FolderIndex through ``transform``; a file that fails to decode at read time is
    replaced by the next usable one (with a warning) so that a damaged file cannot end a run."""

    def __init__(self, index: FolderIndex, transform: Callable):
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int]:
        """``item`` is a sample index, or (index, seed) to draw the augmentation from its own seed."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        for offset in range(len(self.index.samples)):
            path, label = self.index.samples[(i + offset) % len(self.index.samples)]
            try:
                img = _load_rgb(path)
            except (OSError, ValueError) as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc}")
                continue
            if seed is None:
                return self.transform(img), label
            # torchvision draws from the global RNG: fork it so the caller's stream is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(img), label
        raise RuntimeError("no readable image left in the dataset")


class _TwoViews:
    def __init__(self, view1: Callable, view2: Callable):
        self.view1, self.view2 = view1, view2

    def __call__(self, img: Image.Image):
        return self.view1(img), self.view2(img)


class TorchTrainLoader(ShardedEpochs):
    """Two-view batches ``(view1, view2, labels)`` for one rank's shard, on ``device``.

    The permutation of an epoch depends only on (seed, epoch) and each sample's augmentation on its
    seed and slot, so ``set_epoch(e, s)`` after a restart reproduces epoch e from micro-batch s exactly.
    """

    def __init__(self, index: FolderIndex, *, recipe: str, batch_size: int, image_size: int,
                 device: torch.device | str, num_workers: int, seed: int, shard_id: int = 0, num_shards: int = 1,
                 micro_batches: int = 1):
        super().__init__(index, batch_size=batch_size, seed=seed, shard_id=shard_id, num_shards=num_shards,
                         micro_batches=micro_batches)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.dataset = FolderDataset(index, _TwoViews(*two_view_transforms(recipe, image_size)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # Each sample's augmentation has its own seed (epoch, slot), so the batches from any start
        # step on equal those of the whole epoch, with or without worker processes or other ranks.
        indices, slots, epoch_seed = self.epoch_indices(), self.epoch_slots(), self.epoch_seed()
        first = self.start_step * self.batch_size
        items = [(indices[p], sample_seed(epoch_seed, slots[p])) for p in range(first, len(indices))]
        collect_before_fork(self.num_workers)
        loader = DataLoader(
            torch.utils.data.Subset(self.dataset, items),
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for (view1, view2), labels in loader:
            yield (view1.to(self.device, non_blocking=True), view2.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


class TorchEvalLoader:
    """Single-view evaluation batches ``(images, labels)`` in file order (no shuffling, no drop)."""

    def __init__(self, index: FolderIndex, *, batch_size: int, image_size: int, device: torch.device | str,
                 num_workers: int, shard_id: int = 0, num_shards: int = 1, transform: Callable | None = None):
        self.index = index
        self.classes = index.classes
        self.device = torch.device(device)
        samples = list(range(shard_id, len(index), num_shards))
        self.loader = DataLoader(
            torch.utils.data.Subset(FolderDataset(index, transform or eval_transform(image_size)), samples),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        collect_before_fork(self.loader.num_workers)
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
