"""Data loaders: DALI on the GPU (CPU backend without one) or the reference's torchvision pipeline.

Every loader is an iterable with ``len()`` (steps per epoch), ``set_epoch(e)`` (train loaders),
``classes`` and ``index`` (the FolderIndex it reads, with the files it skipped).

A backend runs as one of three data paths: ``dali-mixed`` (nvJPEG decoding and GPU augmentation),
``dali-cpu`` (DALI's CPU backend, batches copied to the loader's device) or ``torchvision``.
``checked_loader`` takes the first of them that builds and runs a batch here, the trainer's start-up
check: the loader functions below accept a backend or a path.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Callable

import torch

from ..errors import FallbackError

from .evaluation import Evaluation, evaluation_data
from .folder import (UNLABELED, DatasetError, FolderIndex, check_hold_out, check_same_classes, hold_out,
                     scan_split, scan_training_images)
from .torch_loader import TorchEvalLoader, TorchTrainLoader

BACKENDS = ("dali", "torchvision")
DATA_PATHS = ("dali-mixed", "dali-cpu", "torchvision")
_ACCEPTED = ("dali", *DATA_PATHS)  # what the loader functions take: a backend or a path
_DECODERS = {"dali-mixed": "mixed", "dali-cpu": "cpu"}


def resolve_backend(backend: str) -> str:
    """``dali`` falls back to ``torchvision`` with one warning when our DALI pipelines cannot be
    imported (DALI itself, or Numba, which its CPU colour step needs)."""
    if backend not in _ACCEPTED:
        raise ValueError(f"unknown data backend {backend!r}; expected one of {_ACCEPTED}")
    if backend == "dali":
        try:
            importlib.import_module(f"{__name__}.dali")
        except Exception as exc:  # a broken install raises more than ImportError
            warnings.warn(f"DALI is unavailable ({type(exc).__name__}: {exc}); using the torchvision loader instead "
                          "(pip install 'lcr-fast[cuda13]', or [cuda12] for a CUDA 12 driver, installs it)")
            return "torchvision"
    return backend


def build_train_loader(data_dir: str | os.PathLike, recipe: str, batch_size: int, image_size: int, backend: str,
                       device: torch.device | str, num_threads: int, seed: int, shard_id: int = 0, num_shards: int = 1,
                       *, index: FolderIndex | None = None, micro_batches: int = 1):
    """Two-view training batches ``(view1, view2, labels)`` of one rank's shard of the training images of
    ``data_dir`` (``scan_training_images``: ``train/``'s class folders, or unlabeled images, whose labels
    are all UNLABELED); ``micro_batches`` batches of ``batch_size`` make one optimizer step (gradient accumulation).

    The first ten parameters are the public signature (DESIGN.md) and may come by position; the
    loaders themselves take keywords only."""
    index = index or scan_training_images(data_dir)
    backend = resolve_backend(backend)
    common = dict(recipe=recipe, batch_size=batch_size, image_size=image_size, device=device, seed=seed,
                  shard_id=shard_id, num_shards=num_shards, micro_batches=micro_batches)
    if backend != "torchvision":
        from .dali import DaliTrainLoader

        # num_threads 0 means "no worker processes" to torchvision; DALI always needs a thread.
        return DaliTrainLoader(index, num_threads=max(1, num_threads), decoder=_DECODERS.get(backend), **common)
    return TorchTrainLoader(index, num_workers=num_threads, **common)


def build_eval_loader(data_dir: str | os.PathLike, split: str, batch_size: int, image_size: int, backend: str,
                      device: torch.device | str, num_threads: int = 2, shard_id: int = 0, num_shards: int = 1,
                      *, index: FolderIndex | None = None):
    """Evaluation batches ``(images, labels)`` of ``data_dir/split`` in file order."""
    index = index or scan_split(data_dir, split)
    backend = resolve_backend(backend)
    common = dict(batch_size=batch_size, image_size=image_size, device=device, shard_id=shard_id,
                  num_shards=num_shards)
    if backend != "torchvision":
        from .dali import DaliEvalLoader

        return DaliEvalLoader(index, num_threads=max(1, num_threads), decoder=_DECODERS.get(backend), **common)
    return TorchEvalLoader(index, num_workers=num_threads, **common)


def data_paths(backend: str, device: torch.device | str) -> list[str]:
    """The data paths to try for ``backend`` on ``device``, best first: ``dali`` is ``dali-mixed`` on a
    GPU and ``dali-cpu`` elsewhere, and each DALI path falls back to the CPU backend, then torchvision."""
    if backend == "dali":
        backend = "dali-mixed" if torch.device(device).type == "cuda" else "dali-cpu"
    if backend not in DATA_PATHS:
        raise ValueError(f"unknown data backend {backend!r}; expected one of {_ACCEPTED}")
    return list(DATA_PATHS[DATA_PATHS.index(backend):])


def checked_loader(build: Callable[[str], Any], backend: str, device: torch.device | str,
                   strict: bool = False) -> tuple[Any, str]:
    """``(loader, path)``: ``build(path)`` for the first path of ``data_paths(backend, device)`` whose
    loader builds and runs one batch (DALI's ``check``; its pipeline is then kept for the first epoch).

    The torchvision loader is the last resort and is not probed. Falling back warns once, naming each
    failed path and its error; with ``strict`` (engine.strict) a failure raises FallbackError instead.
    A DatasetError is the data's fault, not the path's: it is raised as it is.
    """
    *dali, last = data_paths(backend, device)
    failures = []
    for path in dali:
        try:
            loader = build(path)
            loader.check()
            break
        except DatasetError:
            raise
        except Exception as exc:  # DALI reports build and run failures as RuntimeError; imports fail otherwise
            failure = f"{path} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
            if strict:
                raise FallbackError(f"data: {failure}; engine.strict forbids falling back") from exc
            failures.append(failure)
    else:
        path, loader = last, build(last)
    if failures:
        warnings.warn(f"data: {'; '.join(failures)}; using {path} instead")
    return loader, path


__all__ = [
    "BACKENDS", "DATA_PATHS", "UNLABELED", "DatasetError", "Evaluation", "FolderIndex", "build_eval_loader",
    "build_train_loader", "check_hold_out", "check_same_classes", "checked_loader", "data_paths", "evaluation_data",
    "hold_out", "resolve_backend", "scan_split", "scan_training_images",
]
