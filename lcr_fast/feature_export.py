"""The evaluation features (GAP and rationale, as ``model.extract`` gives them) of a folder of images, to one file.

The folder is an ImageFolder split (``<folder>/<class>/<image>``: labels follow the sorted class
names, as torchvision's ImageFolder) or a plain folder of images (no labels). The file is ``.npz``
(numpy) or ``.pt`` (torch) and holds ``gap`` and ``rationale`` [N, D] float32, ``paths`` (relative to
the folder, in the order of the rows), ``labels`` [N] and ``classes`` when there are labels, and
``meta`` (a JSON string: checkpoint, crop size, batch size, ...).

The reference normalises the rationale map over the whole batch, so a rationale feature depends on
the images batched with it: the file records the batch size, and the features equal ``extract()``
on those batches.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_save
from .data import FolderIndex, TorchEvalLoader, scan_split
from .data.folder import IMAGE_EXTENSIONS, DatasetError, unlabeled_index
from .errors import InputError
from .eval.features import extract_features
from .eval.numerics import EvalNumerics

FEATURES_FORMAT = "lcr-fast-features/1"
FEATURE_SUFFIXES = (".npz", ".pt")
FEATURE_KEYS = ("gap", "rationale")
# Sub-folders that mark a data set's root rather than one of its splits.
_SPLIT_NAMES = {"train", "test", "val"}


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)


def index_images(folder: str | os.PathLike) -> FolderIndex:
    """The images of ``folder``: an ImageFolder split (class sub-folders, labels) or a folder of images
    (labels -1, ``classes`` empty). DatasetError for a folder that is missing, empty, or both at once."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is a file, not a directory" if folder.exists() else "does not exist"
        raise DatasetError(f"image folder {str(folder)!r} {problem}")
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    images = [e.name for e in entries if _is_image(e)]
    subfolders = [e.name for e in entries if e.is_dir()]
    if images and subfolders:
        raise DatasetError(f"{str(folder)!r} holds both image files and sub-folders: give a folder of class "
                           f"sub-folders (labelled) or a folder of images (unlabelled)")
    if images:
        return unlabeled_index(folder, [str(folder / name) for name in images], folder.name)
    if not subfolders:
        raise DatasetError(f"{str(folder)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) and no class "
                           f"sub-folders")
    if _SPLIT_NAMES.issuperset(subfolders):
        raise DatasetError(f"{str(folder)!r} holds the splits {', '.join(subfolders)}, not classes: give one split, "
                           f"e.g. {str(folder / subfolders[0])!r}")
    return scan_split(folder.parent, folder.name)


def extract_folder(model: nn.Module, index: FolderIndex, *, batch_size: int, image_size: int,
                   device: torch.device, num_workers: int, numerics: EvalNumerics | None = None,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """``model.extract``'s gap and rationale features of every image of ``index``, in its order, on the CPU;
    the images in the evaluation transform (Resize 8/7 + CenterCrop, bicubic), ``batch_size`` at a time, in
    ``numerics`` (the run's precision and layout, as lcr-eval computes)."""
    loader = TorchEvalLoader(index, batch_size=batch_size, image_size=image_size, device=device,
                             num_workers=num_workers)
    feats, _ = extract_features(model, loader, keys=FEATURE_KEYS, progress=progress, desc="features",
                                numerics=numerics)
    return {k: v.cpu() for k, v in feats.items()}


def feature_record(index: FolderIndex, feats: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    """What the file holds, as numpy arrays and plain values: features, paths, labels and classes where there
    are labels, and ``meta`` (with the format and the folder) as a JSON string."""
    record: dict[str, Any] = {k: feats[k].numpy().astype(np.float32) for k in FEATURE_KEYS}
    record["paths"] = np.array([os.path.relpath(path, index.root) for path, _ in index.samples])
    if index.classes:
        record["labels"] = np.array([label for _, label in index.samples], dtype=np.int64)
        record["classes"] = np.array(index.classes)
    record["meta"] = json.dumps({"format": FEATURES_FORMAT, "folder": str(Path(index.root).resolve()),
                                 "labelled": bool(index.classes), "count": len(index.samples), **meta})
    return record


def write_features(record: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``record`` to ``out``: ``.npz`` (arrays; ``meta`` a 0-d string) or ``.pt`` (tensors, lists of
    strings, ``meta`` a string), atomically."""
    out = Path(out)
    if out.suffix not in FEATURE_SUFFIXES:
        raise InputError(f"--out {str(out)!r} must end with {' or '.join(FEATURE_SUFFIXES)}")
    if out.suffix == ".pt":
        atomic_save({k: v if isinstance(v, str) else torch.from_numpy(v) if v.dtype.kind in "fi" else v.tolist()
                     for k, v in record.items()}, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=out.name, dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.array(v) if isinstance(v, str) else v for k, v in record.items()})
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def read_features(path: str | os.PathLike) -> dict[str, Any]:
    """A features file as written: arrays (``.npz``) or tensors and lists (``.pt``); ``meta`` as a dict."""
    path = Path(path)
    if path.suffix == ".pt":
        record = torch.load(path, map_location="cpu", weights_only=True)
    else:
        with np.load(path, allow_pickle=False) as data:
            record = {k: data[k] for k in data.files}
        record["meta"] = str(record["meta"])
    record["meta"] = json.loads(record["meta"])
    return record
