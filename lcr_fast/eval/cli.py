"""Evaluate a checkpoint: leave-one-out retrieval, weighted kNN and linear probes on frozen features.

    lcr-eval --ckpt runs/cub/ckpt/last.pt --data_dir /data/CUB_200_2011
    python -m lcr_fast.eval --ckpt byol_cub.pth --method byol --config configs/byol_cub200.yaml \
        --data_dir /data/CUB_200_2011 --protocol retrieval
    lcr-eval --ckpt ... --data_dir ... --protocol linear --linear_protocol reference --epochs 100

``--ckpt`` is one of our training checkpoints (``last.pt``, which carries its config) or a reference
``.pth`` / ``.pth.tar`` (then ``--method`` says byol or moco, and ``--config`` may give what the file
cannot tell: image size, stem max-pool). Protocols:

- ``retrieval``: leave-one-out over the test split, cosine similarity, rank-1 / rank-5 / mAP
  (``main_moco.py``'s ``validate``).
- ``knn``: weighted kNN, k=200, t=0.1, train split as the bank (the reference's training monitor).
- ``linear``: a Linear(D, classes) on frozen features, SGD lr 30, momentum 0.9, wd 0, LR x0.1 at
  epochs 60 and 80, batch 256. ``--linear_protocol reference`` is ``main_lincls.py``: features taken
  afresh each epoch from RandomResizedCrop + flip images, tested on Resize + CenterCrop (hours on a
  full data set). ``cached`` (the default) trains on features extracted once without augmentation
  (seconds): a different protocol, reported under its own name.

Results go to ``<out>/<checkpoint name>_eval.json`` and ``.md`` (``--out`` defaults to the
checkpoint's folder) and the table is printed. Retrieval figures are fractions in the JSON (as
``retrieval_metrics`` returns them), kNN and linear accuracies percentages (as the reference prints
them); the Markdown table shows all of them in percent. Input errors (a checkpoint of another
method, a data folder without ``test/``, train and test with different classes, ...) end with one
line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from lcr_fast import engine as eng
from lcr_fast.checkpoint import UnsafeCheckpointError
from lcr_fast.compat import CheckpointMismatchError
from lcr_fast.config import ConfigError, load_config
from lcr_fast.data import BACKENDS, DatasetError, build_eval_loader, check_same_classes, scan_split
from lcr_fast.data.torch_loader import TorchEvalLoader, _FolderDataset
from lcr_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize
from lcr_fast.eval.features import extract_features
from lcr_fast.eval.knn import knn_accuracy
from lcr_fast.eval.linear import linear_probe_cached, linear_probe_reference
from lcr_fast.eval.retrieval import retrieval_metrics
from lcr_fast.loading import load_model

PROTOCOLS = ("retrieval", "knn", "linear")
LINEAR_PROTOCOLS = ("cached", "reference")
# main_lincls.py's schedule.
LINEAR_LR, LINEAR_MOMENTUM, LINEAR_WEIGHT_DECAY, LINEAR_MILESTONES, LINEAR_BATCH = 30.0, 0.9, 0.0, (60, 80), 256


class EvalInputError(ValueError):
    """An argument or input file the evaluation cannot use."""


# Errors that mean "your input is wrong": one line on stderr and exit status 2, no traceback.
USER_ERRORS = (EvalInputError, ConfigError, DatasetError, CheckpointMismatchError, UnsafeCheckpointError, FileNotFoundError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lcr-eval", description="Evaluate an LCR checkpoint (ours or the reference's).")
    p.add_argument("--ckpt", required=True, help="our last.pt, or a reference .pth/.pth.tar (then --method)")
    p.add_argument("--method", choices=("byol", "moco"), default=None,
                   help="what a reference checkpoint holds (default: --config's model.name); checked against ours")
    p.add_argument("--config", default=None,
                   help="YAML for a reference checkpoint (image size, max-pool, ...); ours carry their own")
    p.add_argument("--data_dir", default=os.getenv("DATA"), help="ImageFolder root with test/ (and train/) (env DATA)")
    p.add_argument("--protocol", choices=PROTOCOLS + ("all",), default="all")
    p.add_argument("--features", choices=("rationale", "gap"), default="rationale",
                   help="rationale-weighted pooling (the paper's evaluation feature) or plain GAP of layer4")
    p.add_argument("--linear_protocol", choices=LINEAR_PROTOCOLS, default="cached",
                   help="cached: features extracted once, no augmentation (seconds); reference: main_lincls.py")
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs (LR x0.1 at 60 and 80)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="feature-extraction batch (default: the config's data.eval_batch_size or train.batch_size, "
                        "what training evaluated with: the reference's batch-wide rationale normalisation makes "
                        "rationale features depend on the batch)")
    p.add_argument("--linear_batch_size", type=int, default=LINEAR_BATCH, help="linear probe batch (main_lincls: 256)")
    p.add_argument("--image_size", type=int, default=None, help="crop size (default: the config's dataset.image_size)")
    p.add_argument("--backend", choices=BACKENDS, default="torchvision",
                   help="loader for retrieval/kNN/cached features (the reference linear protocol always uses "
                        "main_lincls's torchvision transforms)")
    p.add_argument("--num_workers", type=int, default=None, help="loader workers (default: the config's dataset.num_workers)")
    p.add_argument("--knn_k", type=int, default=200)
    p.add_argument("--knn_t", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="linear probe initialisation and batch order")
    p.add_argument("--out", default=None, help="folder for the JSON and Markdown results (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--hide_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.data_dir is None:
        p.error("missing --data_dir (or the DATA environment variable)")
    for name in ("epochs", "linear_batch_size", "knn_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    return args


def lincls_transforms(image_size: int) -> tuple[T.Compose, T.Compose]:
    """main_lincls.py's transforms, scaled to ``image_size``: RandomResizedCrop + flip for training,
    Resize(8/7) + CenterCrop for testing, torchvision's default (bilinear) interpolation as there."""
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + normalize)
    test = T.Compose([T.Resize(eval_resize(image_size)), T.CenterCrop(image_size)] + normalize)
    return train, test


def _protocols(protocol: str) -> tuple[str, ...]:
    return PROTOCOLS if protocol == "all" else (protocol,)


def load_for_eval(ckpt: str, method: str | None = None, config_path: str | None = None):
    """(model, config) for evaluation: ``load_model`` with a YAML ``config_path`` for reference files;
    ``method`` defaults to that YAML's model.name. Input problems raise one of USER_ERRORS."""
    config = load_config(config_path) if config_path is not None else None
    method = method or (config.model.name if config is not None else None)
    try:
        return load_model(ckpt, method, config.to_dict() if config is not None else None)
    except USER_ERRORS:
        raise
    except ValueError as exc:  # e.g. a reference file without --method
        raise EvalInputError(str(exc)) from exc


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a torch.device (default: CUDA when available), or EvalInputError."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise EvalInputError(f"unknown --device {name!r} ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError(f"--device {name} asked for, but CUDA is not available")
    return device


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Run the chosen protocols; returns the results (also written to ``<out>/<name>_eval.{json,md}``)."""
    protocols = _protocols(args.protocol)
    show = not args.hide_progress
    # The data first: a bad folder fails in seconds, before any model is built.
    test_index = scan_split(args.data_dir, "test")
    train_index = None
    if "knn" in protocols or "linear" in protocols:
        train_index = scan_split(args.data_dir, "train")
        check_same_classes(train_index, test_index)
    if "retrieval" in protocols and len(test_index) < 2:
        raise EvalInputError(f"leave-one-out retrieval needs at least 2 test images, {str(test_index.root)!r} has {len(test_index)}")
    device = resolve_device(args.device)

    model, cfg = load_for_eval(args.ckpt, args.method, args.config)
    model = model.to(device).eval()
    precision = eng.resolve_precision(cfg.engine.precision, device)
    amp = eng.autocast(precision, device)
    image_size = args.image_size or cfg.dataset.image_size
    batch_size = args.batch_size or cfg.data.eval_batch_size or cfg.train.batch_size
    workers = min(cfg.dataset.num_workers, os.cpu_count() or 1) if args.num_workers is None else args.num_workers
    num_classes = len(test_index.classes)
    key = args.features

    results: dict = {
        "checkpoint": os.path.abspath(args.ckpt),
        "method": cfg.model.name,
        "backbone": _backbone_name(model, cfg),
        "data_dir": os.path.abspath(args.data_dir),
        "features": key,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": str(device),
        "precision": precision,
        "backend": args.backend,
        "num_classes": num_classes,
        "num_test": len(test_index),
        "num_train": len(train_index) if train_index is not None else None,
        "units": {"retrieval": "fraction", "knn": "percent", "linear": "percent"},
        "seconds": {},
    }

    def loader(split, index):
        return build_eval_loader(args.data_dir, split, batch_size, image_size, args.backend, device, workers, index=index)

    def timed(name, fn):
        tic = time.perf_counter()
        out = fn()
        results["seconds"][name] = round(time.perf_counter() - tic, 3)
        return out

    needs_cached = "retrieval" in protocols or "knn" in protocols or ("linear" in protocols and args.linear_protocol == "cached")
    test_feats = test_labels = train_feats = train_labels = None
    if needs_cached:
        (test_feats, test_labels) = timed("test_features", lambda: extract_features(
            model, loader("test", test_index), keys=(key,), progress=show, desc="test features", autocast=amp))
        test_feats = test_feats[key]
    if train_index is not None and ("knn" in protocols or args.linear_protocol == "cached"):
        (train_feats, train_labels) = timed("train_features", lambda: extract_features(
            model, loader("train", train_index), keys=(key,), progress=show, desc="train features", autocast=amp))
        train_feats = train_feats[key]

    if "retrieval" in protocols:
        metrics = timed("retrieval", lambda: retrieval_metrics(test_feats, test_labels))
        results["retrieval"] = {**metrics, "split": "test", "protocol": "leave-one-out, cosine similarity"}
    if "knn" in protocols:
        k = min(args.knn_k, len(train_index))
        top1 = timed("knn", lambda: knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=k, t=args.knn_t,
                                                 num_classes=num_classes))
        results["knn"] = {"top1": top1, "k": k, "t": args.knn_t, "bank": "train"}
    if "linear" in protocols:
        settings = {"protocol": args.linear_protocol, "epochs": args.epochs, "lr": LINEAR_LR, "momentum": LINEAR_MOMENTUM,
                    "weight_decay": LINEAR_WEIGHT_DECAY, "milestones": list(LINEAR_MILESTONES),
                    "batch_size": args.linear_batch_size, "seed": args.seed}
        if args.linear_protocol == "cached":
            accuracy = timed("linear", lambda: linear_probe_cached(
                train_feats, train_labels, test_feats, test_labels, num_classes, epochs=args.epochs, lr=LINEAR_LR,
                momentum=LINEAR_MOMENTUM, weight_decay=LINEAR_WEIGHT_DECAY, milestones=LINEAR_MILESTONES,
                batch_size=args.linear_batch_size, seed=args.seed))
            settings["augmentation"] = "none: features extracted once (Resize + CenterCrop)"
        else:
            accuracy = timed("linear", lambda: _linear_reference(args, model, key, train_index, test_index, image_size,
                                                                 workers, device, amp, num_classes, show))
            settings["augmentation"] = "main_lincls: RandomResizedCrop + flip (train), Resize + CenterCrop (test)"
        results["linear"] = {**accuracy, **settings}

    out_dir = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    stem = _stem(args.ckpt)
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{stem}_eval.json"), os.path.join(out_dir, f"{stem}_eval.md")
    results["json"], results["markdown"] = json_path, md_path
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with open(md_path, "w") as f:
        f.write(markdown(results))
    return results


def _linear_reference(args, model, key, train_index, test_index, image_size, workers, device, amp, num_classes, show):
    """main_lincls.py: the frozen model (eval mode) re-extracts features of augmented images every epoch."""
    train_tf, test_tf = lincls_transforms(image_size)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(_FolderDataset(train_index, train_tf), batch_size=args.linear_batch_size, shuffle=True,
                              num_workers=workers, pin_memory=device.type == "cuda", generator=generator,
                              persistent_workers=workers > 0)
    test_loader = TorchEvalLoader(test_index, args.linear_batch_size, image_size, device, workers, transform=test_tf)

    def extract(images):
        with amp:
            return model.extract(images)[key].float()

    feature_dim = getattr(getattr(model, "backbone", None), "output_dim", None)
    if feature_dim is None:
        images, _ = next(iter(test_loader))
        feature_dim = extract(images[:2]).shape[1]
    # The transforms draw from torch's global RNG in the main process (workers: from the generator).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return linear_probe_reference(extract, train_loader, test_loader, num_classes, feature_dim, epochs=args.epochs,
                                      lr=LINEAR_LR, momentum=LINEAR_MOMENTUM, weight_decay=LINEAR_WEIGHT_DECAY,
                                      milestones=LINEAR_MILESTONES, device=device, progress=show, seed=args.seed)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".pth.tar", ".pth", ".pt", ".tar", ".ckpt"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _backbone_name(model, cfg) -> str:
    """The config's backbone name, unless the model's blocks contradict it (a reference file read
    without --config gets default settings, its shapes from the file): then what the blocks say."""
    name = cfg.model.backbone
    block = type(getattr(getattr(model, "backbone", None), "layer1", [None])[0]).__name__
    depth = {"Bottleneck": "resnet50", "BasicBlock": "resnet18"}.get(block)
    return name if depth is None or name.startswith(depth) else depth


def _pct(x: float) -> str:
    return f"{x:.2f}"


def markdown(results: dict) -> str:
    """The results as a Markdown table, every figure in percent."""
    feats = results["features"]
    lines = [f"# Evaluation of `{os.path.basename(results['checkpoint'])}`", "",
             f"{results['method']} + LCR, {results['backbone']}, {results['image_size']} px, "
             f"{results['num_classes']} classes, {results['num_test']} test"
             + (f" / {results['num_train']} train" if results.get("num_train") else "") + " images, "
             f"{feats} features, {results['device']} ({results['precision']}).", "",
             "| protocol | features | metric | value (%) |", "| --- | --- | --- | --- |"]
    if "retrieval" in results:
        r = results["retrieval"]
        for metric, label in (("rank1", "rank-1"), ("rank5", "rank-5"), ("mAP", "mAP")):
            lines.append(f"| retrieval (leave-one-out, test split) | {feats} | {label} | {_pct(100 * r[metric])} |")
    if "knn" in results:
        r = results["knn"]
        lines.append(f"| kNN (k={r['k']}, t={r['t']}, train split as the bank) | {feats} | top-1 | {_pct(r['top1'])} |")
    if "linear" in results:
        r = results["linear"]
        label = ("linear probe, cached features (no augmentation; not main_lincls)" if r["protocol"] == "cached"
                 else "linear probe, reference protocol (main_lincls)")
        label += f", {r['epochs']} epochs"
        lines.append(f"| {label} | {feats} | top-1 | {_pct(r['top1'])} |")
        lines.append(f"| {label} | {feats} | top-5 | {_pct(r['top5'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``lcr-eval``): prints the table; input errors exit with status 2."""
    try:
        args = parse_args(argv)
        results = evaluate_checkpoint(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(results), end="")
    print(f"results written to {results['json']} and {results['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
