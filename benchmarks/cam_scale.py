"""What the rationale KL fits the rationale map to, measured on a trained checkpoint.

    python benchmarks/cam_scale.py --ckpt demo/run/ckpt/last.pt --data_dir demo/data
    python benchmarks/cam_scale.py --ckpt logs/cub/ckpt/last.pt --data_dir ./CUB200 --n 64

The KL's target is softmax(cam / t) with the GradCAM left unscaled, as the reference leaves it. Where the
CAM's values are far below t, that softmax is the uniform distribution, and a falling KL means the
rationale map is flattening rather than following GradCAM (``fixes.scale_cam`` scales each image's CAM
to [0, 1] before the KL; the figures below are then those of the scaled CAM). This runs one training
forward (a deep copy of the model in train mode, the training recipe's two views of ``--n`` training
images drawn with a fixed seed, the caller's RNG restored) and prints, per image, the CAM's peak, the
target's largest probability against the uniform 1/cells, and the rationale map's spread (max - min).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lcr_fast.config import recipe_for  # noqa: E402
from lcr_fast.data.folder import scan_split  # noqa: E402
from lcr_fast.data.transforms import two_view_transforms  # noqa: E402
from lcr_fast.loading import load_model  # noqa: E402


def kl_target_stats(model: torch.nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, float]:
    """Medians over the images of one training forward of a deep copy of ``model``: the CAM's peak (and
    the batch's largest, "cam_peak_largest"), the KL target's largest probability (with the temperature
    and the rows the model's own KL uses), the uniform probability of one cell of those rows, and the
    rationale map's max - min."""
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(), torch.enable_grad():
        out = probe(view1, view2)
    cam, attention = out["gradcam"].detach().float(), out["attention"].detach().float()
    # BYOL's KL has a temperature over the flattened map; the reference's MoCo KL has none, row by row.
    temperature = probe.rationale.temperature
    rows = cam.flatten(1) if probe.rationale.flatten_kl else cam
    target = (rows / temperature).softmax(-1)
    per_image = target.reshape(cam.shape[0], -1, rows.shape[-1]).amax(dim=(1, 2))
    return {"cam_peak": cam.flatten(1).amax(1).median().item(), "cam_peak_largest": cam.max().item(),
            "target_max": per_image.median().item(),
            "uniform": 1.0 / rows.shape[-1],
            "attention_spread": (attention.flatten(1).amax(1) - attention.flatten(1).amin(1)).median().item()}


def training_views(data_dir: str, recipe: str, image_size: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's two views of ``n`` training images spread over the classes, drawn with ``seed``."""
    index = scan_split(data_dir, "train")
    picks = index.samples[:: max(1, len(index.samples) // n)][:n]
    first, second = two_view_transforms(recipe, image_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        images = [Image.open(path).convert("RGB") for path, _ in picks]
        return torch.stack([first(i) for i in images]), torch.stack([second(i) for i in images])


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="an lcr-fast training checkpoint")
    parser.add_argument("--data_dir", required=True, help="the ImageFolder dataset (its train/ split is read)")
    parser.add_argument("--n", type=int, default=32, help="images in the batch")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    model, config = load_model(args.ckpt)
    view1, view2 = training_views(args.data_dir, recipe_for(config), config.dataset.image_size, args.n, args.seed)
    stats = kl_target_stats(model, view1, view2)
    print(f"{args.ckpt}: {args.n} training images, medians per image")
    largest = stats["cam_peak_largest"]
    print(f"  GradCAM peak                     {stats['cam_peak']:.3g}   (largest of the batch: {largest:.3g})")
    print(f"  KL target's largest probability  {stats['target_max']:.7f}   (uniform: {stats['uniform']:.7f})")
    print(f"  rationale map max - min          {stats['attention_spread']:.4f}   (of a [0, 1] batch-wide range)")


if __name__ == "__main__":
    main()
