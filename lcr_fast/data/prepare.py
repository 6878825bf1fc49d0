"""Turn the official downloads of CUB-200-2011, Stanford Cars and FGVC-Aircraft into the trainer's ImageFolder splits.

The trainer reads ``DST/train/<class>/<image>`` and ``DST/test/<class>/<image>`` and numbers classes by their
sorted folder names. Every class folder therefore starts with its zero-padded official index
(``001.Black_footed_Albatross``, ``004.F-16A_B``), so that label k is class k+1 of the dataset's own list, and
both splits hold every class folder, even one that a split has no image of.

Usage::

    lcr-prepare cub200 ~/downloads/CUB_200_2011.tgz data/cub200
    lcr-prepare cub200 ~/downloads/CUB_200_2011 data/cub200 --link symlink
    lcr-prepare stanfordcars ~/downloads/stanford_cars data/stanfordcars
    lcr-prepare aircraft ~/downloads/fgvc-aircraft-2013b data/aircraft-family --level family
    python -m lcr_fast.data.prepare aircraft ~/downloads data/aircraft --force --quiet

Sources (each given as the folder itself or the folder holding it):

* ``cub200``: ``CUB_200_2011/`` (``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
  ``classes.txt``, ``images/``) or the ``CUB_200_2011.tgz`` archive itself.
* ``stanfordcars``: torchvision's ``stanford_cars/`` (``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat``,
  ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``).
* ``aircraft``: ``fgvc-aircraft-2013b/`` with its ``data/`` folder; the paper's split is trainval -> train,
  test -> test, at the ``--level`` chosen (variant by default).

``--link auto`` (the default) hard-links each image where SRC and DST share a file system, which costs no disk
space and survives the download being moved or deleted, and copies otherwise. Images inside an archive are
always copied out. ``DST/prepare.json`` records what was done. Exit status 2 means an unusable source or
destination, told in one ``error:`` line on stderr; a source whose counts differ from the official release
(a subset, say) is prepared with a ``warning:`` line.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import posixpath
import re
import shutil
import sys
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import scipy.io
from torchvision.datasets import FGVCAircraft, StanfordCars
from tqdm import tqdm

from lcr_fast.errors import InputError, run_cli

DATASETS = ("cub200", "stanfordcars", "aircraft")
LEVELS = ("variant", "family", "manufacturer")
LINK_MODES = ("auto", "hardlink", "symlink", "copy")
SPLITS = ("train", "test")

# (train images, test images, classes) of each official release; aircraft by annotation level.
OFFICIAL_COUNTS: dict[tuple[str, str | None], tuple[int, int, int]] = {
    ("cub200", None): (5994, 5794, 200),
    ("stanfordcars", None): (8144, 8041, 196),
    ("aircraft", "variant"): (6667, 3333, 100),
    ("aircraft", "family"): (6667, 3333, 70),
    ("aircraft", "manufacturer"): (6667, 3333, 30),
}

_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
_AIRCRAFT_CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
_AIRCRAFT_SPLITS = {"train": "trainval", "test": "test"}
# Errors of os.link that mean "this file system will not hard-link here" rather than a broken source:
# another device, no hard-link support, the link-count limit, or protected_hardlinks on files of other owners.
_NO_HARDLINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
_UNSAFE = re.compile(r"[^\w.+-]+")
_INDEX_PREFIX = re.compile(r"^(\d+)\.")


class PrepareError(InputError):
    """A source, metadata file or destination that cannot be used; ``main`` prints it as one ``error:`` line."""


@dataclass
class _Sample:
    split: str
    label: int  # 0-based index into the official class list
    source: str  # a file path, or a member name of the plan's archive
    name: str  # the file name under DST/<split>/<class>/


@dataclass
class _Plan:
    classes: list[str]  # official names in official order
    samples: list[_Sample]
    archive: Path | None = None


def class_folder_names(names: Iterable[str]) -> list[str]:
    """Folder names, one path component each, whose sorted order is the order of ``names``.

    Each is ``NNN.<name>`` with characters other than letters, digits and ``.+-`` made ``_`` (``F-16A/B`` ->
    ``F-16A_B``); the index keeps them unique. A name that already carries its own index, as CUB's do, keeps it.
    """
    names = list(names)
    width = max(3, len(str(len(names))))
    folders = []
    for index, name in enumerate(names, start=1):
        match = _INDEX_PREFIX.match(name)
        if match and int(match.group(1)) == index:
            name = name[match.end():]
        folders.append(f"{index:0{width}d}.{_UNSAFE.sub('_', name.strip()).strip('_')}")
    return folders


def _check_unique(samples: list[_Sample], metadata: str | Path) -> None:
    seen = set()
    for sample in samples:
        key = (sample.split, sample.name)
        if key in seen:
            raise PrepareError(f"{metadata} lists the {sample.split} image {sample.name} twice")
        seen.add(key)


def _train_flag(text: str) -> int:
    if text not in ("0", "1"):
        raise ValueError(text)
    return int(text)


def _id_table(text: str, where: str, expect: str, value: Callable[[str], object]) -> dict[int, object]:
    """Parse CUB's ``<id> <value>`` lines; a garbled line or a repeated id names the file and line."""
    table: dict[int, object] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        try:
            if len(fields) != 2:
                raise ValueError(line)
            key, val = int(fields[0]), value(fields[1].strip())
        except ValueError:
            raise PrepareError(f"{where} line {number}: expected '{expect}', got {line.strip()!r}") from None
        if key in table:
            raise PrepareError(f"{where} line {number}: id {key} appears twice")
        table[key] = val
    if not table:
        raise PrepareError(f"{where} is empty")
    return table


def _cub_rows(read_text: Callable[[str], str], has_image: Callable[[str], bool],
              where: Callable[[str], str]) -> tuple[list[str], list[tuple[str, int, str]]]:
    """CUB's class names (by class id) and ``(split, label, path under images/)`` rows, cross-checked.

    ``read_text`` and ``has_image`` hide whether the files lie in a folder or in the archive.
    """
    images = _id_table(read_text("images.txt"), where("images.txt"), "<image id> <path>", str)
    labels = _id_table(read_text("image_class_labels.txt"), where("image_class_labels.txt"),
                       "<image id> <class id>", int)
    splits = _id_table(read_text("train_test_split.txt"), where("train_test_split.txt"),
                       "<image id> <1 train|0 test>", _train_flag)
    names = _id_table(read_text("classes.txt"), where("classes.txt"), "<class id> <name>", str)
    for table, filename in ((labels, "image_class_labels.txt"), (splits, "train_test_split.txt")):
        lacking = images.keys() - table.keys()
        if lacking:
            raise PrepareError(f"{where(filename)} has no line for image id {min(lacking)} "
                               f"({len(lacking)} id(s) of images.txt lack one)")
        extra = table.keys() - images.keys()
        if extra:
            raise PrepareError(f"{where(filename)} refers to image id {min(extra)}, which images.txt does not list")
    class_ids = sorted(names)
    label_of = {class_id: index for index, class_id in enumerate(class_ids)}
    unknown = sorted(image_id for image_id, class_id in labels.items() if class_id not in label_of)
    if unknown:
        raise PrepareError(f"{where('image_class_labels.txt')}: image id {unknown[0]} has class "
                           f"{labels[unknown[0]]}, which classes.txt does not list")
    missing = [path for path in images.values() if not has_image(path)]
    if missing:
        raise PrepareError(f"{where('images.txt')} lists {len(missing)} image(s) that do not exist, "
                           f"e.g. images/{missing[0]}")
    rows = [(SPLITS[0] if splits[i] else SPLITS[1], label_of[labels[i]], images[i]) for i in sorted(images)]
    return [names[class_id] for class_id in class_ids], rows


def _cub_base(src: Path) -> Path:
    if any((src / name).exists() for name in (*_CUB_FILES, "images")):
        return src
    if (src / "CUB_200_2011").is_dir():
        return src / "CUB_200_2011"
    raise PrepareError(f"{src} holds neither CUB_200_2011/ nor its files ({', '.join(_CUB_FILES)}, images/)")


def _read_cub200_folder(src: Path) -> _Plan:
    base = _cub_base(src)

    def read_text(name: str) -> str:
        path = base / name
        if not path.is_file():
            raise PrepareError(f"missing metadata file {path}")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PrepareError(f"cannot read {path}: {exc}") from None

    classes, rows = _cub_rows(read_text, lambda rel: (base / "images" / rel).is_file(), lambda name: str(base / name))
    samples = [_Sample(split, label, str(base / "images" / rel), posixpath.basename(rel)) for split, label, rel in rows]
    _check_unique(samples, base / "images.txt")
    return _Plan(classes, samples)


def _read_cub200_archive(archive: Path) -> _Plan:
    """Read the metadata straight from the archive in one pass; the images are copied out later, in a second."""
    texts: dict[str, bytes] = {}
    files: set[str] = set()
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                name = posixpath.normpath(member.name)
                if not member.isfile():
                    continue
                files.add(name)
                # The official archive keeps them one level down, in CUB_200_2011/.
                if posixpath.basename(name) in _CUB_FILES and name.count("/") <= 1:
                    texts[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise PrepareError(f"cannot read archive {archive}: {exc}") from None
    if not texts:
        raise PrepareError(f"archive {archive} holds none of CUB_200_2011's files ({', '.join(_CUB_FILES)})")
    prefix = posixpath.dirname(min(texts, key=lambda name: name.count("/")))

    def where(name: str) -> str:
        return f"{archive}:{posixpath.join(prefix, name)}"

    def read_text(name: str) -> str:
        data = texts.get(posixpath.join(prefix, name))
        if data is None:
            raise PrepareError(f"missing metadata file {where(name)}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PrepareError(f"cannot read {where(name)}: {exc}") from None

    def member(rel: str) -> str:
        return posixpath.normpath(posixpath.join(prefix, "images", rel))

    classes, rows = _cub_rows(read_text, lambda rel: member(rel) in files, where)
    samples = [_Sample(split, label, member(rel), posixpath.basename(rel)) for split, label, rel in rows]
    _check_unique(samples, where("images.txt"))
    return _Plan(classes, samples, archive=archive)


def _torchvision_root(src: Path, folder: str) -> Path:
    """torchvision finds a dataset at ``root/<folder>`` under that exact name: accept the folder or its parent."""
    if src.name == folder and src.is_dir():
        return src.parent
    if (src / folder).is_dir():
        return src
    raise PrepareError(f"{src} is neither torchvision's {folder}/ folder nor a folder holding one "
                       f"(torchvision needs that exact folder name)")


def _require(files: Iterable[Path] = (), folders: Iterable[Path] = ()) -> None:
    for path in files:
        if not path.is_file():
            raise PrepareError(f"missing metadata file {path}")
    for path in folders:
        if not path.is_dir():
            raise PrepareError(f"missing image folder {path}")


def _loads(path: Path, key: str) -> bool:
    try:
        scipy.io.loadmat(path, squeeze_me=True)[key]
    except Exception:  # scipy raises many types for a damaged file
        return False
    return True


def _read_stanfordcars(src: Path) -> _Plan:
    root = _torchvision_root(src, "stanford_cars")
    base = root / "stanford_cars"
    meta = base / "devkit" / "cars_meta.mat"
    annotations = {"train": base / "devkit" / "cars_train_annos.mat", "test": base / "cars_test_annos_withlabels.mat"}
    folders = {"train": base / "cars_train", "test": base / "cars_test"}
    _require([meta, *annotations.values()], folders.values())
    classes: list[str] = []
    samples: list[_Sample] = []
    for split in SPLITS:
        try:
            # A class id of 0 wraps around in the uint8 arithmetic; the range check below reports it instead.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                dataset = StanfordCars(str(root), split=split, download=False)
        except Exception as exc:  # scipy and numpy raise many types for a damaged .mat file
            # torchvision reads the annotations first, then the class names.
            culprit = meta if _loads(annotations[split], "annotations") and not _loads(meta, "class_names") \
                else annotations[split]
            raise PrepareError(f"cannot read {culprit}: {type(exc).__name__}: {exc}") from None
        # squeeze_me turns a one-entry cell array into its bare string.
        names = [dataset.classes] if isinstance(dataset.classes, str) else list(dataset.classes)
        if not names or not all(isinstance(name, str) and name.strip() for name in names):
            raise PrepareError(f"{meta}: class_names is not a list of non-empty names")
        classes = names
        split_samples = []
        for path, label in dataset._samples:
            if not 0 <= int(label) < len(names):
                raise PrepareError(f"{annotations[split]}: image {Path(path).name} has a class outside "
                                   f"1..{len(names)}")
            split_samples.append(_Sample(split, int(label), path, Path(path).name))
        _check_listed(split_samples, annotations[split], folders[split])
        samples += split_samples
    return _Plan(classes, samples)


def _check_listed(samples: list[_Sample], listing: Path, folder: Path) -> None:
    """Each image that ``listing`` names exists, once."""
    _check_unique(samples, listing)
    missing = [s.name for s in samples if not os.path.isfile(s.source)]
    if missing:
        raise PrepareError(f"{listing} lists {len(missing)} image(s) missing from {folder}, e.g. {missing[0]}")


def _aircraft_failure(class_file: Path, labels_file: Path, exc: Exception) -> str:
    """Point at the file and line behind an FGVCAircraft failure, for the ``error:`` line."""
    try:
        classes = {line.strip() for line in class_file.read_text(encoding="utf-8").splitlines()}
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot read {class_file}: {err}"
    try:
        lines = labels_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot read {labels_file}: {err}"
    for number, line in enumerate(lines, start=1):
        fields = line.strip().split(" ", 1)
        if len(fields) != 2:
            return f"{labels_file} line {number}: expected '<image id> <class name>', got {line.strip()!r}"
        if fields[1] not in classes:
            return f"{labels_file} line {number}: class {fields[1]!r} is not listed in {class_file.name}"
    return f"cannot read {labels_file}: {type(exc).__name__}: {exc}"


def _read_aircraft(src: Path, level: str) -> _Plan:
    root = _torchvision_root(src, "fgvc-aircraft-2013b")
    data = root / "fgvc-aircraft-2013b" / "data"
    class_file = data / _AIRCRAFT_CLASS_FILES[level]
    labels_files = {split: data / f"images_{level}_{name}.txt" for split, name in _AIRCRAFT_SPLITS.items()}
    _require([class_file, *labels_files.values()], [data / "images"])
    classes: list[str] = []
    samples: list[_Sample] = []
    for split, name in _AIRCRAFT_SPLITS.items():
        try:
            dataset = FGVCAircraft(str(root), split=name, annotation_level=level)
        except Exception as exc:  # a damaged text file raises ValueError, KeyError or UnicodeDecodeError
            raise PrepareError(_aircraft_failure(class_file, labels_files[split], exc)) from None
        classes = list(dataset.classes)
        if not all(classes) or len(set(classes)) != len(classes):
            raise PrepareError(f"{class_file} has a blank or repeated class name")
        split_samples = [_Sample(split, label, path, Path(path).name)
                         for path, label in zip(dataset._image_files, dataset._labels)]
        _check_listed(split_samples, labels_files[split], data / "images")
        samples += split_samples
    return _Plan(classes, samples)


def _clear_destination(dst: Path, src: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise PrepareError(f"destination {dst} is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise PrepareError(f"destination {dst} is not empty; pass --force to replace its train/ and test/")
        real_src = Path(os.path.realpath(src))
        doomed = [dst / split for split in SPLITS]
        for target in doomed:
            real = Path(os.path.realpath(target))
            if real_src == real or real in real_src.parents:
                raise PrepareError(f"source {src} lies inside {target}, which --force would delete")
        for target in doomed:
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
    dst.mkdir(parents=True, exist_ok=True)


class _Placer:
    """Puts a source file at its destination; ``auto`` hard-links until the file system refuses, then copies."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.used: list[str] = []

    def place(self, source: str, target: Path) -> None:
        mode = "hardlink" if self.mode == "auto" else self.mode
        if mode == "hardlink":
            try:
                os.link(source, target)
            except OSError as exc:
                if self.mode != "auto" or exc.errno not in _NO_HARDLINK:
                    raise PrepareError(f"cannot hard-link {source} to {target}: {exc.strerror}; "
                                       f"try --link copy") from None
                self.mode = mode = "copy"
        if mode == "symlink":
            os.symlink(source, target)
        elif mode == "copy":
            shutil.copyfile(source, target)
        if mode not in self.used:
            self.used.append(mode)


def _write(plan: _Plan, dst: Path, folders: list[str], link: str, quiet: bool) -> str:
    """Create every class folder of both splits, then place the images; returns the link mode(s) used."""
    for split in SPLITS:
        for folder in folders:
            (dst / split / folder).mkdir(parents=True)
    with tqdm(total=len(plan.samples), unit="img", desc="prepare", disable=quiet, file=sys.stderr) as bar:
        if plan.archive is not None:
            targets = {s.source: dst / s.split / folders[s.label] / s.name for s in plan.samples}
            try:
                with tarfile.open(plan.archive) as tar:
                    for member in tar:  # archive order: the compressed stream is read once, front to back
                        target = targets.pop(posixpath.normpath(member.name), None)
                        if target is None or not member.isfile():
                            continue
                        with tar.extractfile(member) as data, open(target, "wb") as out:
                            shutil.copyfileobj(data, out)
                        bar.update()
            except (tarfile.TarError, EOFError, zlib.error) as exc:
                raise PrepareError(f"cannot read archive {plan.archive}: {exc}") from None
            return "copy"
        placer = _Placer(link)
        for sample in plan.samples:
            placer.place(sample.source, dst / sample.split / folders[sample.label] / sample.name)
            bar.update()
    return "+".join(placer.used) or link


def prepare(dataset: str, src: str | os.PathLike, dst: str | os.PathLike, link: str = "auto",
            level: str | None = None, force: bool = False, quiet: bool = False) -> dict[str, object]:
    """Write ``dst/train`` and ``dst/test`` from an official download and return what ``dst/prepare.json`` holds.

    ``level`` (aircraft only) is ``variant`` (default), ``family`` or ``manufacturer``. Raises PrepareError for an
    unusable source or destination, before anything is written when the source is at fault.
    """
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if link not in LINK_MODES:
        raise PrepareError(f"unknown link mode {link!r}; expected one of {', '.join(LINK_MODES)}")
    if dataset == "aircraft":
        level = level or "variant"
        if level not in LEVELS:
            raise PrepareError(f"unknown aircraft level {level!r}; expected one of {', '.join(LEVELS)}")
    elif level is not None:
        raise PrepareError(f"--level applies to aircraft only, not {dataset}")
    # abspath, not resolve: a symlinked stanford_cars/ must keep the name torchvision looks for.
    src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    if not src.exists():
        raise PrepareError(f"source {src} does not exist")

    if dataset == "cub200":
        if src.is_file():
            # Links need files that outlive the run, and extracting the whole archive just to link to it would
            # leave a second copy behind, so the images are copied straight out of the archive instead.
            if link in ("hardlink", "symlink"):
                raise PrepareError(f"--link {link} needs an extracted source; {src} is an archive (extract it, "
                                   f"or use --link copy)")
            plan = _read_cub200_archive(src)
        else:
            plan = _read_cub200_folder(src)
    elif dataset == "stanfordcars":
        plan = _read_stanfordcars(src)
    else:
        plan = _read_aircraft(src, level)

    _clear_destination(dst, src, force)
    counts = {split: sum(s.split == split for s in plan.samples) for split in SPLITS}
    expected = OFFICIAL_COUNTS[(dataset, level)]
    found = (counts["train"], counts["test"], len(plan.classes))
    if found != expected:
        which = f"{dataset} ({level})" if level else dataset
        print(f"warning: {src} differs from the official {which} release: "
              f"expected {expected[0]} train / {expected[1]} test images in {expected[2]} classes, "
              f"found {found[0]} / {found[1]} in {found[2]}", file=sys.stderr)
    folders = class_folder_names(plan.classes)
    used = _write(plan, dst, folders, link, quiet)
    info: dict[str, object] = {
        "dataset": dataset,
        "source": str(src),
        "level": level,
        "link": used,
        "counts": counts,
        "num_classes": len(folders),
        "classes": folders,
        "official_counts": found == expected,
    }
    (dst / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(
        prog="lcr-prepare", description="Turn an official dataset download into DST/train and DST/test folders.")
    parser.add_argument("dataset", metavar="DATASET", help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("src", metavar="SRC", help="the download: a folder (or its parent), or CUB's .tgz")
    parser.add_argument("dst", metavar="DST", help="where train/ and test/ go; must be empty unless --force")
    parser.add_argument("--link", default="auto", metavar="MODE",
                        help="hardlink, symlink or copy; default: hard links on one file system, else copies")
    parser.add_argument("--level", default=None, metavar="LEVEL",
                        help="aircraft only: variant (default, the paper's), family or manufacturer")
    parser.add_argument("--force", action="store_true", help="write into a non-empty DST, replacing train/ and test/")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _prepare_and_report(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    try:
        info = prepare(args.dataset, args.src, args.dst, link=args.link, level=args.level, force=args.force,
                       quiet=args.quiet)
    except OSError as exc:  # the destination: disk full, permissions
        raise PrepareError(f"cannot write {args.dst!r}: {exc}") from exc
    counts, level = info["counts"], f" ({info['level']})" if info["level"] else ""
    print(f"prepared {info['dataset']}{level}: {counts['train']} train + "
          f"{counts['test']} test images in {info['num_classes']} classes -> {os.path.abspath(args.dst)} "
          f"({info['link']})")


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``lcr-prepare``): exit status 0, or 2 after one ``error:`` line."""
    return run_cli(_prepare_and_report, argv)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
