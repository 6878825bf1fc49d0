"""Index an ImageFolder split (``<data_dir>/<split>/<class>/<image>``) and find unusable files.

Both data backends read the same index, so a file that one backend would skip is skipped by the
other too, and labels always follow the sorted class-folder names as torchvision's ImageFolder does.
"""
from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_JPEG_EXTENSIONS = (".jpg", ".jpeg")
# A JPEG ends with the EOI marker; writers may pad a few bytes after it, so look at the tail.
_JPEG_TAIL_BYTES = 1024


class DatasetError(UserError, ValueError):
    """The data directory cannot be used as an ImageFolder split."""


@dataclass
class FolderIndex:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.samples)


def check_image(path: str) -> str | None:
    """Return why ``path`` cannot be decoded, or None when it looks whole.

    Header parse plus PIL's verify catches most damage; truncated JPEGs pass both, so the
    end-of-image marker is checked as well, which costs one small read instead of a full decode.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            img.verify()
        if path.lower().endswith(_JPEG_EXTENSIONS):
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - _JPEG_TAIL_BYTES))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
    except Exception as exc:  # PIL raises many types for broken files
        return f"cannot decode: {type(exc).__name__}: {exc}"
    return None


def scan_split(data_dir: str | os.PathLike, split: str, check: bool = True, num_threads: int = 8) -> FolderIndex:
    """Index ``data_dir/split``; raise DatasetError for a missing split or a class with no usable image.

    Files whose extension is not an image are ignored; image files that fail ``check_image`` are
    left out and reported once in a warning that counts them.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        problem = "is a file, not a directory" if data_dir.exists() else "does not exist"
        raise DatasetError(f"data directory {str(data_dir)!r} {problem}")
    root = data_dir / split
    if not root.is_dir():
        raise DatasetError(f"{str(data_dir)!r} has no {split!r} folder "
                           f"(expected {str(root)!r} with one sub-folder per class)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(f"{str(root)!r} has no class sub-folders")

    candidates: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    candidates.append((os.path.join(dirpath, filename), label))

    if check:
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            reasons = list(pool.map(check_image, [path for path, _ in candidates]))
    else:
        reasons = [None] * len(candidates)
    samples = [sample for sample, reason in zip(candidates, reasons) if reason is None]
    skipped = [(path, reason) for (path, _), reason in zip(candidates, reasons) if reason is not None]

    counts = [0] * len(classes)
    for _, label in samples:
        counts[label] += 1
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise DatasetError(f"class folder(s) with no usable image in {str(root)!r}: {', '.join(empty)}")
    if skipped:
        examples = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        warnings.warn(f"{split}: skipped {len(skipped)} unreadable image file(s) of {len(candidates)} ({examples})",
                      stacklevel=2)
    return FolderIndex(root=root, classes=classes, samples=samples, skipped=skipped)


def check_same_classes(train: FolderIndex, test: FolderIndex) -> None:
    """Raise DatasetError naming the classes that only one of the two splits has."""
    if train.classes == test.classes:
        return
    only_train = sorted(set(train.classes) - set(test.classes))
    only_test = sorted(set(test.classes) - set(train.classes))
    raise DatasetError(
        f"train and test class folders differ ({len(train.classes)} vs {len(test.classes)} classes); "
        f"only in train: {only_train[:10]}; only in test: {only_test[:10]}"
    )


def _class_members(index: FolderIndex) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in index.classes]
    for i, (_, label) in enumerate(index.samples):
        members[label].append(i)
    return members


def check_hold_out(index: FolderIndex, per_class: int) -> None:
    """DatasetError naming the classes that cannot give ``per_class`` images and keep one to train on."""
    short = [f"{name} ({len(m)})" for name, m in zip(index.classes, _class_members(index)) if len(m) <= per_class]
    if short:
        raise DatasetError(f"data.val_per_class={per_class} holds out {per_class} image(s) per class and leaves at "
                           f"least one to train on, but {len(short)} class(es) of {str(index.root)!r} have "
                           f"{per_class} or fewer: {', '.join(short[:10])}; lower data.val_per_class")


def hold_out(index: FolderIndex, per_class: int, seed: int) -> tuple[FolderIndex, FolderIndex]:
    """(training part, validation part) of ``index``: ``per_class`` images of every class, drawn with
    ``seed``, form the validation part; the others stay for training, in the index's order. Every
    class must keep at least one training image (``check_hold_out``)."""
    check_hold_out(index, per_class)
    members = _class_members(index)
    rng = random.Random(seed)
    held = {i for m in members for i in rng.sample(m, per_class)}
    train = [s for i, s in enumerate(index.samples) if i not in held]
    val = [s for i, s in enumerate(index.samples) if i in held]
    return FolderIndex(index.root, index.classes, train, index.skipped), FolderIndex(index.root, index.classes, val)
