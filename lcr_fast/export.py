"""Take a trained model out of lcr-fast: its backbone for torchvision, or its features of a folder of images.

    lcr-export backbone --ckpt runs/cub/ckpt/last.pt --out exported/byol_cub.pth
    lcr-export backbone --ckpt byol_cub.pth --method byol --out exported/byol_cub_ref.pth
    lcr-export features --ckpt runs/cub/ckpt/last.pt --images /data/CUB_200_2011/test --out cub_test.npz
    lcr-export features --ckpt checkpoint_0099.pth.tar --method moco --images ~/photos --out photos.pt

``--ckpt`` is one of our training checkpoints (it carries its config) or a reference ``.pth`` /
``.pth.tar`` (then ``--method`` says byol or moco, and ``--config`` may give what the file cannot
tell: the stem max-pool, the crop size).

``backbone`` writes the online backbone (BYOL's online network, MoCo's query encoder, SimSiam's
encoder) as a state dict that ``torchvision.models.<arch>()`` loads with ``strict=False``, only
``fc.*`` missing, and beside it ``<out>.json``: arch, stem_maxpool, feature width and stride, the
source, and the Python lines that load it (a backbone trained without the stem max-pool needs
``model.maxpool = torch.nn.Identity()``).

``features`` writes GAP and rationale features (``model.extract``) of an ImageFolder split or a plain
folder of images to ``.npz`` or ``.pt``, with file names and, for class folders, labels
(lcr_fast.feature_export). Input errors end with one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from lcr_fast import methods
from lcr_fast.backbone_export import WEIGHT_SUFFIXES, write_backbone
from lcr_fast.checkpoint import check_checkpoint_file, check_creatable, safe_load
from lcr_fast.errors import run_cli
from lcr_fast.eval.numerics import EvalNumerics
from lcr_fast.feature_export import FEATURE_SUFFIXES, extract_folder, feature_record, index_images, write_features
from lcr_fast.loading import load_for_eval, resolve_device

_OURS = "lcr-fast/1"  # the format tag of our training checkpoints (lcr_fast.checkpoint)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcr-export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, help="our last.pt, or a reference .pth/.pth.tar (then --method)")
    common.add_argument("--method", choices=methods.names(), default=None,
                        help="what a reference checkpoint holds (default: --config's model.name); checked against "
                             "ours")
    common.add_argument("--config", default=None,
                        help="YAML for a reference checkpoint (stem max-pool, image size); ours carry their own")
    common.add_argument("--out", required=True, help="the file to write")
    sub.add_parser("backbone", parents=[common], help="the online backbone as a torchvision state dict (.pth/.pt) "
                                                      "and a JSON card beside it")
    feats = sub.add_parser("features", parents=[common], help="GAP and rationale features of a folder of images "
                                                              "to .npz or .pt")
    feats.add_argument("--images", required=True,
                       help="an ImageFolder split (<dir>/<class>/<image>: labelled) or a folder of images")
    feats.add_argument("--batch_size", type=int, default=None,
                       help="extraction batch (default: the config's data.eval_batch_size or train.batch_size; "
                            "rationale features depend on the batch, as in training's evaluation)")
    feats.add_argument("--image_size", type=int, default=None, help="crop size (default: dataset.image_size)")
    feats.add_argument("--num_workers", type=int, default=None,
                       help="loader workers (default: dataset.num_workers, at most the CPU count)")
    feats.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    feats.add_argument("--hide_progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    suffixes = WEIGHT_SUFFIXES if args.what == "backbone" else FEATURE_SUFFIXES
    if not args.out.endswith(suffixes):
        p.error(f"--out {args.out!r} must end with {' or '.join(suffixes)}")
    if args.what == "features":
        for name, low in (("batch_size", 1), ("image_size", 32), ("num_workers", 0)):
            if getattr(args, name) is not None and getattr(args, name) < low:
                p.error(f"--{name} must be at least {low}")
    return args


def _source(args: argparse.Namespace, cfg) -> dict:
    """Where the weights came from: the checkpoint, its layout and method, and its epoch where it has one."""
    raw = safe_load(args.ckpt)
    ours = isinstance(raw, dict) and raw.get("format") == _OURS
    epoch = raw.get("epoch") if isinstance(raw, dict) else None
    return {"checkpoint": os.path.abspath(args.ckpt), "layout": "lcr-fast" if ours else "reference",
            "method": cfg.model.name, "config_backbone": cfg.model.backbone,
            "epoch": epoch if isinstance(epoch, int) else None}


def export_backbone(args: argparse.Namespace) -> None:
    check_checkpoint_file(args.ckpt)
    check_creatable(os.path.dirname(os.path.abspath(args.out)), "the backbone")
    model, cfg = load_for_eval(args.ckpt, args.method, args.config)
    weights, card = write_backbone(model, args.out, _source(args, cfg))
    print(f"backbone written to {weights}, its card (arch, stem max-pool, how to load it) to {card}")


def export_features(args: argparse.Namespace) -> None:
    check_checkpoint_file(args.ckpt)
    check_creatable(os.path.dirname(os.path.abspath(args.out)), "the features")
    index = index_images(args.images)
    device = resolve_device(args.device)
    model, cfg = load_for_eval(args.ckpt, args.method, args.config)
    model = model.to(device).eval()
    numerics = EvalNumerics.of_run(cfg, device)
    batch_size = args.batch_size or cfg.data.eval_batch_size or cfg.train.batch_size
    image_size = args.image_size or cfg.dataset.image_size
    workers = min(cfg.dataset.num_workers, os.cpu_count() or 1) if args.num_workers is None else args.num_workers
    feats = extract_folder(model, index, batch_size=batch_size, image_size=image_size, device=device,
                           num_workers=workers, numerics=numerics,
                           progress=not args.hide_progress)
    meta = {"checkpoint": os.path.abspath(args.ckpt), "method": cfg.model.name, "image_size": image_size,
            "batch_size": batch_size, "precision": numerics.precision,
            "channels_last": numerics.channels_last, "device": str(device),
            "transform": "Resize(8/7 of the crop, bicubic) + CenterCrop + ImageNet normalisation"}
    out = write_features(feature_record(index, feats, meta), args.out)
    labels = f", {len(index.classes)} classes" if index.classes else ", no labels"
    print(f"features of {len(index)} images{labels} written to {out}")


def _main(argv: list[str] | None) -> None:
    args = parse_args(argv)
    (export_backbone if args.what == "backbone" else export_features)(args)


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (``lcr-export``); returns the exit status (2 for input errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(cli())
