"""Data loaders: DALI on the GPU (CPU backend without one) or the reference's torchvision pipeline.

Every loader is an iterable with ``len()`` (steps per epoch), ``set_epoch(e)`` (train loaders),
``classes`` and ``index`` (the FolderIndex it reads, with the files it skipped).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from .folder import DatasetError, FolderIndex, check_same_classes, scan_split
from .torch_loader import TorchEvalLoader, TorchTrainLoader

BACKENDS = ("dali", "torchvision")


def resolve_backend(backend: str) -> str:
    """``dali`` falls back to ``torchvision`` with one warning when our DALI pipelines cannot be
    imported (DALI itself, or Numba, which its CPU colour step needs)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; expected one of {BACKENDS}")
    if backend == "dali":
        try:
            importlib.import_module(f"{__name__}.dali")
        except Exception as exc:  # a broken install raises more than ImportError
            warnings.warn(f"DALI is unavailable ({type(exc).__name__}: {exc}); using the torchvision loader instead")
            return "torchvision"
    return backend


def build_train_loader(data_dir: str | os.PathLike, recipe: str, batch_size: int, image_size: int, backend: str,
                       device: torch.device | str, num_threads: int, seed: int, shard_id: int = 0, num_shards: int = 1,
                       index: FolderIndex | None = None, micro_batches: int = 1):
    """Two-view training batches ``(view1, view2, labels)`` of one rank's shard of ``data_dir/train``;
    ``micro_batches`` batches of ``batch_size`` make one optimizer step (gradient accumulation)."""
    index = index or scan_split(data_dir, "train")
    backend = resolve_backend(backend)
    if backend == "dali":
        from .dali import DaliTrainLoader

        # num_threads 0 means "no worker processes" to torchvision; DALI always needs a thread.
        return DaliTrainLoader(index, recipe, batch_size, image_size, device, max(1, num_threads), seed, shard_id, num_shards,
                               micro_batches)
    return TorchTrainLoader(index, recipe, batch_size, image_size, device, num_threads, seed, shard_id, num_shards, micro_batches)


def build_eval_loader(data_dir: str | os.PathLike, split: str, batch_size: int, image_size: int, backend: str,
                      device: torch.device | str, num_threads: int = 2, shard_id: int = 0, num_shards: int = 1,
                      index: FolderIndex | None = None):
    """Evaluation batches ``(images, labels)`` of ``data_dir/split`` in file order."""
    index = index or scan_split(data_dir, split)
    backend = resolve_backend(backend)
    if backend == "dali":
        from .dali import DaliEvalLoader

        return DaliEvalLoader(index, batch_size, image_size, device, max(1, num_threads), shard_id, num_shards)
    return TorchEvalLoader(index, batch_size, image_size, device, num_threads, shard_id, num_shards)


__all__ = [
    "BACKENDS", "DatasetError", "FolderIndex", "build_eval_loader", "build_train_loader", "check_same_classes",
    "resolve_backend", "scan_split",
]
