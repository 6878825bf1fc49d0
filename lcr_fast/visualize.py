"""Rationale heatmaps, the paper's qualitative figure: per image, the GradCAM of the SSL loss and the
rationale map that LCR trains to match it.

    python -m lcr_fast.visualize --ckpt runs/cub/ckpt/last.pt --data_dir /data/CUB_200_2011 --out heatmaps.png
    python -m lcr_fast.visualize --ckpt byol_cub.pth --method byol --config configs/byol_cub200.yaml \
        --data_dir /data/CUB_200_2011 --out heatmaps.png --n 8

The grid has one row per image and four panels: the image, the GradCAM, the rationale map, and both
laid over the image (GradCAM red, rationale green, yellow where they agree). Each map is upsampled
bilinearly from layer4's h x w to the image size and scaled to its own [min, max] for display.

How the maps are computed (``rationale_maps``): the SSL loss needs two views, so view 1 is the image
itself and view 2 its horizontal mirror (a flip is part of both training recipes, keeps the content,
and is deterministic, so the figure does not change from run to run). One forward of the model's
training objective, ``model(view1, view2)``, returns the GradCAM of that loss on view 1's layer4
(cam = ReLU(sum_c F * dL/dF), as in training) and the rationale map of view 1. It runs on a deep copy
of the model in eval mode: BatchNorm uses its running statistics, the ones the evaluation features
use, so an image's GradCAM does not depend on the other images shown; no parameter, BN statistic or
MoCo queue of the caller's model changes, and the global RNG is restored afterwards. The rationale
map is min-max normalised over the whole batch as the reference does (so it is the map that
``model.extract`` weights the evaluation features with). A MoCo model enqueues the batch's keys (on
the copy), so the number of images must divide its queue size K.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcr_fast import methods
from lcr_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lcr_fast.errors import run_cli
from lcr_fast.lcr import per_image_unit

PANELS = ("image", "GradCAM of the SSL loss", "rationale map", "overlay (red: GradCAM,\ngreen: rationale)")
HEADER_PX = 28  # the strip with the column titles


def rationale_maps(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(GradCAM of the SSL loss [B, h, w], rationale map [B, h, w]) of ``images`` (view 1; view 2 is
    their mirror image), from a deep copy of ``model`` in eval mode; ``model`` is left untouched."""
    probe = copy.deepcopy(model).eval()
    device = next(probe.parameters()).device
    view1 = images.detach().to(device, torch.float32)
    # The input requires a gradient, so GradCAM's autograd.grad works even on a frozen model.
    view1 = view1.clone().requires_grad_(True)
    view2 = view1.detach().flip(-1)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        out = probe(view1, view2)
    return out["gradcam"].detach().float(), out["attention"].detach().float()


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def heatmap_panels(images: Tensor, cam: Tensor, attention: Tensor,
                   mean_std=(IMAGENET_MEAN, IMAGENET_STD)) -> dict[str, np.ndarray]:
    """The four panels as arrays: image [B,H,W,3], cam and rationale [B,H,W] in [0, 1], overlay [B,H,W,3]."""
    mean = torch.tensor(mean_std[0], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(mean_std[1], dtype=torch.float32).view(1, 3, 1, 1)
    rgb = (images.detach().cpu().float() * std + mean).clamp(0, 1)
    size = (rgb.shape[2], rgb.shape[3])
    cam = per_image_unit(_upsample(cam.cpu(), size))
    att = per_image_unit(_upsample(attention.cpu(), size))
    gray = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[..., None]
    colour = torch.stack([cam, att, torch.zeros_like(cam)], dim=-1)
    overlay = (0.45 * gray + 0.55 * colour).clamp(0, 1)
    return {"image": rgb.permute(0, 2, 3, 1).numpy(), "gradcam": cam.numpy(), "rationale": att.numpy(),
            "overlay": overlay.numpy()}


def write_heatmaps(model: nn.Module, images: Tensor, out_path: str, mean_std=(IMAGENET_MEAN, IMAGENET_STD),
                   titles: list[str] | None = None, panel_px: int = 128,
                   maps: tuple[Tensor, Tensor] | None = None) -> str:
    """Write the heatmap grid of ``images`` (a normalised batch [N, 3, H, W]) to ``out_path`` (PNG).

    The picture is exactly ``4 * panel_px`` pixels wide and ``28 + N * panel_px`` high (a title strip,
    then one row of four ``panel_px`` square panels per image). ``titles`` (one per image, e.g. class
    names) label the image panels. ``maps`` are ``rationale_maps(model, images)`` when the caller
    computed them already (in a multi-rank run every rank must run MoCo's forward, which gathers
    across ranks, while one rank draws). Returns ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cam, attention = maps if maps is not None else rationale_maps(model, images)
    panels = heatmap_panels(images, cam, attention, mean_std)
    n = images.shape[0]
    dpi = 100
    width, height = 4 * panel_px, HEADER_PX + n * panel_px
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for col, title in enumerate(PANELS):
        fig.text((col + 0.5) / 4, 1 - HEADER_PX / 2 / height, title, ha="center", va="center",
                 fontsize=6.5 * min(1.0, panel_px / 128), linespacing=1.0)
    for row in range(n):
        for col, key in enumerate(("image", "gradcam", "rationale", "overlay")):
            left, bottom = col * panel_px / width, (height - HEADER_PX - (row + 1) * panel_px) / height
            ax = fig.add_axes((left, bottom, panel_px / width, panel_px / height))
            ax.set_axis_off()
            if key in ("gradcam", "rationale"):
                ax.imshow(panels[key][row], cmap="jet", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(panels[key][row], interpolation="nearest")
            if key == "image" and titles is not None:
                ax.text(2, 2, str(titles[row])[:24], color="white", fontsize=6, va="top",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return out_path


def pick_images(index, n: int, image_size: int) -> tuple[Tensor, list[str]]:
    """Up to ``n`` evaluation-transformed images spread evenly over ``index`` (which is in class
    order, so several classes appear), with their class names."""
    from lcr_fast.data.torch_loader import TorchEvalLoader

    picks = sorted({int(round(i)) for i in np.linspace(0, len(index) - 1, min(n, len(index)))})
    subset = dataclasses.replace(index, samples=[index.samples[i] for i in picks])
    images, labels = next(iter(TorchEvalLoader(subset, batch_size=len(picks), image_size=image_size, device="cpu",
                                            num_workers=0)))
    return images, [index.classes[int(label)] for label in labels]


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(prog="python -m lcr_fast.visualize",
                                description="GradCAM and rationale heatmaps of a checkpoint.")
    p.add_argument("--ckpt", required=True, help="our last.pt, or a reference .pth/.pth.tar (then --method)")
    p.add_argument("--method", choices=methods.names(), default=None)
    p.add_argument("--config", default=None, help="YAML for a reference checkpoint (image size, max-pool, ...)")
    p.add_argument("--data_dir", default=os.getenv("DATA"), help="ImageFolder root (env DATA)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--n", type=int, default=8, help="images (rows), spread evenly over the split")
    p.add_argument("--image_size", type=int, default=None, help="crop size (default: the config's dataset.image_size)")
    p.add_argument("--panel_px", type=int, default=128, help="pixels per square panel")
    p.add_argument("--device", default=None, help="default: cuda when available")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.data_dir is None:
        p.error("missing --data_dir (or the DATA environment variable)")
    if args.n < 1 or args.panel_px < 16:
        p.error("--n must be at least 1 and --panel_px at least 16")
    if args.image_size is not None and args.image_size < 32:
        p.error("--image_size must be at least 32 (as dataset.image_size)")
    return args


def visualize(args: argparse.Namespace) -> str:
    """Write the heatmap grid that ``args`` (``parse_args``) ask for; returns the PNG's path."""
    from lcr_fast.checkpoint import check_checkpoint_file, check_creatable
    from lcr_fast.data import scan_split
    from lcr_fast.loading import load_for_eval, resolve_device

    check_checkpoint_file(args.ckpt)
    check_creatable(os.path.dirname(os.path.abspath(args.out)), "the picture")
    index = scan_split(args.data_dir, args.split)
    device = resolve_device(args.device)
    model, cfg = load_for_eval(args.ckpt, args.method, args.config)
    images, titles = pick_images(index, args.n, args.image_size or cfg.dataset.image_size)
    return write_heatmaps(model.to(device), images, args.out, titles=titles, panel_px=args.panel_px)


def _visualize_and_print(argv: list[str] | None) -> None:
    print(f"heatmaps written to {visualize(parse_args(argv))}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: writes the PNG; returns the exit status (2 for input errors)."""
    return run_cli(_visualize_and_print, argv)


if __name__ == "__main__":
    sys.exit(main())
