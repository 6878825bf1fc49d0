"""Evaluate a checkpoint: leave-one-out retrieval, weighted kNN and linear probes on frozen features.

    lcr-eval --ckpt runs/cub/ckpt/last.pt --data_dir /data/CUB_200_2011
    python -m lcr_fast.eval --ckpt byol_cub.pth --method byol --config configs/byol_cub200.yaml \
        --data_dir /data/CUB_200_2011 --protocol retrieval
    lcr-eval --ckpt ... --data_dir ... --protocol linear --linear_protocol reference --epochs 100
    lcr-eval --ckpt ... --data_dir ... --protocol linear              # BYOL: the config's eval section, as main.py

``--ckpt`` is one of our training checkpoints (``last.pt``, which carries its config) or a reference
``.pth`` / ``.pth.tar`` (then ``--method`` says byol or moco, and ``--config`` may give what the file
cannot tell: image size, stem max-pool). Protocols:

- ``retrieval``: leave-one-out over the test split, cosine similarity, rank-1 / rank-5 / mAP
  (``main_moco.py``'s ``validate``).
- ``knn``: weighted kNN, k=200, t=0.1, train split as the bank (the reference's training monitor).
- ``linear``: a Linear(D, classes) on frozen features, trained with the settings of the config's
  ``eval`` section (the checkpoint's own, or ``--config``'s): SGD at eval.base_lr x batch / 256,
  eval.optimizer.momentum and weight_decay, eval.batch_size, eval.num_epochs (``--epochs`` and
  ``--linear_batch_size`` override the last two). ``--linear_protocol lcr`` (the default for BYOL)
  is the evaluation the reference's BYOL ``main.py`` runs after training (``linear_cub_eval.py``):
  the same function as the trainer's, per-iteration warmup + cosine, features re-extracted from
  RandomResizedCrop + flip images at every iteration; here it always evaluates the checkpoint's
  weights. ``reference`` is MoCo's ``main_lincls.py``: LR x0.1 at epochs 60 and 80, features taken
  afresh each epoch (hours on a full data set). ``cached`` (the default for MoCo) trains on features
  extracted once without augmentation (seconds): a different protocol, reported under its own name.

Results go to ``<out>/<checkpoint name>_eval.json`` and ``.md`` (``--out`` defaults to the
checkpoint's folder) and the table is printed. Retrieval figures are fractions in the JSON (as
``retrieval_metrics`` returns them), kNN and linear accuracies percentages (as the reference prints
them); the Markdown table shows all of them in percent. Input errors (a checkpoint of another
method, a data folder without ``test/``, train and test with different classes, ...) end with one
line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from lcr_fast import methods
from lcr_fast.checkpoint import check_checkpoint_file, check_creatable
from lcr_fast.config import DEFAULTS, Config, load_config
from lcr_fast.data import BACKENDS, FolderIndex, build_eval_loader, check_same_classes, hold_out, scan_split
from lcr_fast.data.torch_loader import FolderDataset, TorchEvalLoader
from lcr_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize
from lcr_fast.errors import InputError, run_cli
from lcr_fast.eval.features import extract_features
from lcr_fast.eval.knn import knn_accuracy
from lcr_fast.eval.linear import LINCLS_MILESTONES, linear_eval_lcr, linear_probe_cached, linear_probe_reference
from lcr_fast.eval.numerics import EvalNumerics
from lcr_fast.eval.retrieval import retrieval_metrics
from lcr_fast.loading import load_for_eval, resolve_device
from lcr_fast.models.backbone import ResNetTrunk, infer_arch, resolve_arch
from lcr_fast.optim import scaled_lr
from lcr_fast.results import evaluation_markdown, write_evaluation_report

PROTOCOLS = ("retrieval", "knn", "linear")
LINEAR_PROTOCOLS = ("lcr", "cached", "reference")


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(prog="lcr-eval", description="Evaluate an LCR checkpoint (ours or the reference's).")
    p.add_argument("--ckpt", required=True, help="our last.pt, or a reference .pth/.pth.tar (then --method)")
    p.add_argument("--method", choices=methods.names(), default=None,
                   help="what a reference checkpoint holds (default: --config's model.name); checked against ours")
    p.add_argument("--config", default=None,
                   help="YAML for a reference checkpoint (image size, max-pool, ...); ours carry their own")
    p.add_argument("--data_dir", default=os.getenv("DATA"), help="ImageFolder root with test/ (and train/) (env DATA)")
    p.add_argument("--protocol", choices=PROTOCOLS + ("all",), default="all")
    p.add_argument("--features", choices=("rationale", "gap"), default="rationale",
                   help="rationale-weighted pooling (the paper's evaluation feature) or plain GAP of layer4")
    p.add_argument("--linear_protocol", choices=LINEAR_PROTOCOLS, default=None,
                   help="lcr: BYOL main.py's linear evaluation (default for BYOL); cached: features extracted once, "
                        "no augmentation, seconds (default for MoCo); reference: MoCo's main_lincls.py")
    p.add_argument("--epochs", type=int, default=None, help="linear epochs (default: the config's eval.num_epochs)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="feature-extraction batch (default: the config's data.eval_batch_size or train.batch_size, "
                        "what training evaluated with: the reference's batch-wide rationale normalisation makes "
                        "rationale features depend on the batch)")
    p.add_argument("--linear_batch_size", type=int, default=None,
                   help="linear batch (default: the config's eval.batch_size; the LR scales with it)")
    p.add_argument("--image_size", type=int, default=None, help="crop size (default: the config's dataset.image_size)")
    p.add_argument("--backend", choices=BACKENDS, default="torchvision",
                   help="loader for retrieval/kNN/cached features (the reference linear protocol always uses "
                        "main_lincls's torchvision transforms)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="loader workers (default: the config's dataset.num_workers)")
    p.add_argument("--knn_k", type=int, default=200)
    p.add_argument("--knn_t", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=None,
                   help="linear initialisation, batch order and augmentation (default: the config's seed, else 0)")
    p.add_argument("--out", default=None, help="folder for the JSON and Markdown results (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--hide_progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.data_dir is None:
        p.error("missing --data_dir (or the DATA environment variable)")
    for name in ("epochs", "linear_batch_size", "knn_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if args.image_size is not None and args.image_size < 32:
        p.error("--image_size must be at least 32 (as dataset.image_size)")
    if args.num_workers is not None and args.num_workers < 0:
        p.error("--num_workers must be at least 0")
    if not args.knn_t > 0:
        p.error("--knn_t must be above 0")
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


@dataclass
class _Job:
    """One evaluation: the arguments, the checked inputs, the model and where results accumulate."""

    args: argparse.Namespace
    protocols: tuple[str, ...]
    train_index: FolderIndex | None
    test_index: FolderIndex
    model: torch.nn.Module
    cfg: Config  # the checkpoint's (or --config's)
    device: torch.device
    numerics: EvalNumerics  # the run's precision and layout, as its own evaluations computed
    image_size: int
    batch_size: int
    workers: int
    results: dict

    @property
    def num_classes(self) -> int:
        return len(self.test_index.classes)

    def timed(self, name: str, fn: Callable[[], object]):
        tic = time.perf_counter()
        out = fn()
        self.results["seconds"][name] = round(time.perf_counter() - tic, 3)
        return out


def _check_inputs(args: argparse.Namespace, protocols: tuple[str, ...]) -> tuple[FolderIndex | None, FolderIndex]:
    """(train index or None, test index), checked in seconds, before any model is built."""
    check_checkpoint_file(args.ckpt)
    check_creatable(args.out or os.path.dirname(os.path.abspath(args.ckpt)), "results")
    test_index = scan_split(args.data_dir, "test")
    train_index = None
    if "knn" in protocols or "linear" in protocols:
        train_index = scan_split(args.data_dir, "train")
        check_same_classes(train_index, test_index)
    if "retrieval" in protocols and len(test_index) < 2:
        raise InputError(f"leave-one-out retrieval needs at least 2 test images, {str(test_index.root)!r} "
                         f"has {len(test_index)}")
    return train_index, test_index


def _set_up(args: argparse.Namespace) -> _Job:
    protocols = _protocols(args.protocol)
    train_index, test_index = _check_inputs(args, protocols)
    device = resolve_device(args.device)
    model, cfg = load_for_eval(args.ckpt, args.method, args.config)
    model = model.to(device).eval()
    held_out = cfg.data.val_per_class if train_index is not None else 0
    if held_out:
        # The images a run held out for validation it never trained on: the kNN bank and the linear classifier
        # leave them out as well, as the trainer's own evaluations do.
        train_index, _ = hold_out(train_index, held_out, cfg.seed or 0)
    numerics = EvalNumerics.of_run(cfg, device)
    image_size = args.image_size or cfg.dataset.image_size
    batch_size = args.batch_size or cfg.data.eval_batch_size or cfg.train.batch_size
    workers = min(cfg.dataset.num_workers, os.cpu_count() or 1) if args.num_workers is None else args.num_workers
    results: dict = {
        "checkpoint": os.path.abspath(args.ckpt), "method": cfg.model.name, "backbone": _backbone_name(model, cfg),
        "data_dir": os.path.abspath(args.data_dir), "features": args.features, "image_size": image_size,
        "batch_size": batch_size, "device": str(device), "precision": numerics.precision,
        "channels_last": numerics.channels_last, "backend": args.backend,
        "num_classes": len(test_index.classes), "num_test": len(test_index),
        "num_train": len(train_index) if train_index is not None else None, "held_out_per_class": held_out,
        "units": {"retrieval": "fraction", "knn": "percent", "linear": "percent"}, "seconds": {},
    }
    return _Job(args, protocols, train_index, test_index, model, cfg, device, numerics,
                image_size, batch_size, workers, results)


def _features(job: _Job, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of a split in evaluation transforms, extracted once."""
    index = job.train_index if split == "train" else job.test_index
    loader = build_eval_loader(job.args.data_dir, split, job.batch_size, job.image_size, job.args.backend, job.device,
                               job.workers, index=index)
    feats, labels = job.timed(f"{split}_features", lambda: extract_features(
        job.model, loader, keys=(job.args.features,), progress=not job.args.hide_progress, desc=f"{split} features",
        numerics=job.numerics))
    return feats[job.args.features], labels


def linear_protocol(args: argparse.Namespace, cfg: Config) -> str:
    """``--linear_protocol``, else the method's own (lcr_fast.methods): lcr for BYOL (its main.py), cached for
    the others (fast)."""
    return args.linear_protocol or methods.get(cfg.model.name).linear_protocol


def linear_config(job: _Job) -> Config:
    """The config the linear protocols read: the checkpoint's eval section (its defaults where it is
    false) with the command line's overrides, crop size, workers and seed."""
    args, cfg = job.args, job.cfg
    section = cfg.eval.to_dict() if cfg.eval is not False else DEFAULTS["eval"]
    overrides = {"num_epochs": args.epochs, "batch_size": args.linear_batch_size}
    seed = args.seed if args.seed is not None else cfg.seed or 0
    return load_config(None, {**cfg.to_dict(), "seed": seed,
                              "eval": {**section, **{k: v for k, v in overrides.items() if v is not None}},
                              "dataset": {**cfg.dataset.to_dict(), "image_size": job.image_size,
                                          "num_workers": job.workers}})


def _linear(job: _Job, train: tuple | None, test: tuple | None) -> dict:
    """The linear evaluation under ``--linear_protocol``, with its settings."""
    args, protocol = job.args, linear_protocol(job.args, job.cfg)
    cfg = linear_config(job)
    if protocol == "lcr":
        result = job.timed("linear", lambda: linear_eval_lcr(
            job.model, job.train_index, job.test_index, cfg, job.device, key=args.features, numerics=job.numerics,
            progress=not args.hide_progress))
        return {**result, "weights": "the checkpoint's"}
    ev = cfg.eval
    hyper = {"epochs": ev.num_epochs, "lr": scaled_lr(ev.base_lr, ev.batch_size), "momentum": ev.optimizer.momentum,
             "weight_decay": ev.optimizer.weight_decay, "milestones": LINCLS_MILESTONES}
    settings = {"protocol": protocol, **hyper, "milestones": list(LINCLS_MILESTONES), "batch_size": ev.batch_size,
                "seed": cfg.seed}
    if protocol == "cached":
        accuracy = job.timed("linear", lambda: linear_probe_cached(
            *train, *test, job.num_classes, **hyper, batch_size=ev.batch_size, seed=cfg.seed))
        settings["augmentation"] = "none: features extracted once (Resize + CenterCrop)"
    else:
        accuracy = job.timed("linear", lambda: _linear_reference(job, ev.batch_size, cfg.seed, hyper))
        settings["augmentation"] = "main_lincls: RandomResizedCrop + flip (train), Resize + CenterCrop (test)"
    return {**accuracy, **settings}


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Run the chosen protocols; returns the results (also written to ``<out>/<name>_eval.{json,md}``)."""
    job = _set_up(args)
    protocols, results = job.protocols, job.results
    cached_linear = "linear" in protocols and linear_protocol(args, job.cfg) == "cached"
    test = _features(job, "test") if {"retrieval", "knn"} & set(protocols) or cached_linear else None
    train = _features(job, "train") if "knn" in protocols or cached_linear else None
    if "retrieval" in protocols:
        metrics = job.timed("retrieval", lambda: retrieval_metrics(*test))
        results["retrieval"] = {**metrics, "split": "test", "protocol": "leave-one-out, cosine similarity"}
    if "knn" in protocols:
        k = min(args.knn_k, len(job.train_index))
        top1 = job.timed("knn", lambda: knn_accuracy(*train, *test, k=k, t=args.knn_t, num_classes=job.num_classes))
        results["knn"] = {"top1": top1, "k": k, "t": args.knn_t, "bank": "train"}
    if "linear" in protocols:
        results["linear"] = _linear(job, train, test)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    results["json"], results["markdown"] = write_evaluation_report(results, out_dir, _stem(args.ckpt))
    return results


def _linear_reference(job: _Job, batch_size: int, seed: int, hyper: dict) -> dict:
    """main_lincls.py with the settings ``hyper``: the frozen model (eval mode) re-extracts features
    of augmented images every epoch."""
    model, device, workers = job.model, job.device, job.workers
    train_tf, test_tf = lincls_transforms(job.image_size)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(FolderDataset(job.train_index, train_tf), batch_size=batch_size, shuffle=True,
                              num_workers=workers, pin_memory=device.type == "cuda", generator=generator,
                              persistent_workers=workers > 0)
    test_loader = TorchEvalLoader(job.test_index, batch_size=batch_size, image_size=job.image_size, device=device,
                                  num_workers=workers, transform=test_tf)

    def extract(images):
        return job.numerics.extract(model, images)[job.args.features].float()

    feature_dim = getattr(getattr(model, "backbone", None), "output_dim", None)
    if feature_dim is None:
        images, _ = next(iter(test_loader))
        feature_dim = extract(images[:2]).shape[1]
    # The transforms draw from torch's global RNG in the main process (workers: from the generator).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return linear_probe_reference(extract, train_loader, test_loader, job.num_classes, feature_dim, **hyper,
                                      device=device, progress=not job.args.hide_progress, seed=seed)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".pth.tar", ".pth", ".pt", ".tar", ".ckpt"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _backbone_name(model, cfg) -> str:
    """The config's backbone name, unless the model's tensors contradict it (a reference file read
    without --config gets default settings, its shapes from the file): then the arch they fit."""
    name = cfg.model.backbone
    trunk = getattr(model, "backbone", None)
    arch = infer_arch(trunk.state_dict()) if isinstance(trunk, ResNetTrunk) else None
    return name if arch is None or resolve_arch(name, None)[0] == arch else arch


def _evaluate_and_print(argv: list[str] | None) -> None:
    results = evaluate_checkpoint(parse_args(argv))
    print(evaluation_markdown(results), end="")
    print(f"results written to {results['json']} and {results['markdown']}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``lcr-eval``): prints the table; returns the exit status (2 for input errors)."""
    return run_cli(_evaluate_and_print, argv)


if __name__ == "__main__":
    sys.exit(main())
