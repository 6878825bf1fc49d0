"""Index an ImageFolder split (``<data_dir>/<split>/<class>/<image>``) or a folder of unlabeled images,
and find unusable files.

Both data backends read the same index, so a file that one backend would skip is skipped by the
other too, and labels always follow the sorted class-folder names as torchvision's ImageFolder does.
An unlabeled index has no classes and gives every sample the label UNLABELED.
"""
from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .formats import IMAGE_EXTENSIONS, check_image

UNLABELED = -1  # the label of every image of an unlabeled folder; loaders pass it on as they read it


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

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


def _image_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (links followed) whose extension is an image's, in sorted order."""
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        found += [os.path.join(dirpath, name) for name in sorted(filenames) if name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _checked(candidates: list[tuple[str, int]], split: str, check: bool,
             num_threads: int) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(usable samples, (path, reason) of the others) of ``candidates``; one warning counts the skipped."""
    if check:
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            reasons = list(pool.map(check_image, [path for path, _ in candidates]))
    else:
        reasons = [None] * len(candidates)
    samples = [sample for sample, reason in zip(candidates, reasons) if reason is None]
    skipped = [(path, reason) for (path, _), reason in zip(candidates, reasons) if reason is not None]
    if skipped:
        examples = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        warnings.warn(f"{split}: skipped {len(skipped)} unreadable image file(s) of {len(candidates)} ({examples})",
                      stacklevel=3)
    return samples, skipped


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
        loose = " (it holds images, but labels come from class folders)" if _image_files(root) else ""
        raise DatasetError(f"{str(root)!r} has no class sub-folders{loose}")

    candidates = [(path, label) for label, name in enumerate(classes) for path in _image_files(root / name)]
    samples, skipped = _checked(candidates, split, check, num_threads)
    counts = [0] * len(classes)
    for _, label in samples:
        counts[label] += 1
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise DatasetError(f"class folder(s) with no usable image in {str(root)!r}: {', '.join(empty)}")
    return FolderIndex(root=root, classes=classes, samples=samples, skipped=skipped)


def scan_training_images(data_dir: str | os.PathLike, check: bool = True, num_threads: int = 8) -> FolderIndex:
    """The images a run trains on, in the first layout of these that ``data_dir`` has:

    - ``train/`` with class sub-folders: the reference's ImageFolder split, labeled (``scan_split``);
    - ``train/`` holding images and no sub-folder: those images, unlabeled;
    - no ``train/`` (nor ``test/``, which would mean a reference layout that lacks its train/): every
      image under ``data_dir``, sub-folders included, unlabeled.

    Raises DatasetError for a folder with no usable image.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        problem = "is a file, not a directory" if data_dir.exists() else "does not exist"
        raise DatasetError(f"data directory {str(data_dir)!r} {problem}")
    root = data_dir / "train"
    if root.is_dir():
        with os.scandir(root) as entries:  # closed here: any() stops at the first class folder
            labeled = any(entry.is_dir() for entry in entries)
        if labeled:
            return scan_split(data_dir, "train", check, num_threads)
    elif (data_dir / "test").is_dir():
        raise DatasetError(f"{str(data_dir)!r} has a 'test' folder but no 'train' folder (expected "
                           f"{str(root)!r} with one sub-folder per class, or with the unlabeled images themselves)")
    else:
        root = data_dir
    return unlabeled_index(root, _image_files(root), "train", check, num_threads)


def unlabeled_index(root: str | os.PathLike, paths: list[str], split: str, check: bool = True,
                    num_threads: int = 8) -> FolderIndex:
    """An unlabeled FolderIndex of the image files ``paths`` under ``root``, the unreadable ones left out
    with one warning (named by ``split``); DatasetError when there is none, or none can be read."""
    root = Path(root)
    if not paths:
        raise DatasetError(f"{str(root)!r} holds no image files (extensions {', '.join(IMAGE_EXTENSIONS)})")
    samples, skipped = _checked([(path, UNLABELED) for path in paths], split, check, num_threads)
    if not samples:
        raise DatasetError(f"none of the {len(paths)} image file(s) in {str(root)!r} can be read "
                           f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
    return FolderIndex(root=root, classes=[], samples=samples, skipped=skipped)


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
