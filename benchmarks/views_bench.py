"""Two views through a ResNet trunk: as one batch with per-view BatchNorm statistics against a call per view.

    python benchmarks/views_bench.py                    # ResNet-50 without max-pool, batch 8 per view, 112 px
    python benchmarks/views_bench.py --arch resnet18 --rounds 9

What BYOL's and SimSiam's forward choose between on the CPU (``ResNetTrunk.batches_views``): the online trunk's
forward and backward and the target trunk's no-grad forward, each way, in turns, the median of ``--rounds``, with
the trainer's defaults (fp32, channels_last, freed memory kept).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcr_fast.host_memory import keep_freed_memory  # noqa: E402
from lcr_fast.models.backbone import build_backbone  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    p.add_argument("--batch", type=int, default=8, help="samples per view")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--rounds", type=int, default=6)
    return p


def main() -> None:
    args = build_parser().parse_args()
    keep_freed_memory()
    trunk = build_backbone("resnet50_cub200" if args.arch == "resnet50" else args.arch,
                           maxpool=args.arch != "resnet50").train().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch, 3, args.size, args.size, generator=g).contiguous(memory_format=torch.channels_last)
             for _ in range(2)]
    if not trunk.batches_views(views[0]):
        sys.exit("the fused CPU BatchNorm is not available here, so the trunk would not batch the views")
    joint = torch.cat(views)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        trunk.zero_grad(set_to_none=True)

    cases = {
        "forward and backward, one batch": lambda: backward(trunk(joint, views=2).sum()),
        "forward and backward, a call per view": lambda: backward(trunk(views[0]).sum() + trunk(views[1]).sum()),
        "no-grad forward, one batch": lambda: torch.no_grad()(trunk)(joint, views=2),
        "no-grad forward, a call per view": lambda: [torch.no_grad()(trunk)(v) for v in views],
    }
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            tic = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - tic)
    print(f"{args.arch}, two views of batch {args.batch}, {args.size} px, fp32, channels_last, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} in turns")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>40}: {medians[name]:.3f} s  ({' '.join(f'{s:.2f}' for s in t)})")
    for what in ("forward and backward", "no-grad forward"):
        print(f"{what}: a call per view / one batch = "
              f"{medians[what + ', a call per view'] / medians[what + ', one batch']:.2f}x")


if __name__ == "__main__":
    main()
