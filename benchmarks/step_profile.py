"""Where one training step spends its time: torch.profiler's top operators for one side of step_bench.

    python benchmarks/step_profile.py                       # ours, the trainer's defaults, CPU shape of step_bench
    python benchmarks/step_profile.py --variant reference   # the reference's step
    python benchmarks/step_profile.py --precision fp32 --no-channels_last --top 25

Runs ``--warmup`` steps, then profiles ``--steps`` more and prints the operators by self time (time
spent in the operator itself, not in the operators it calls), each with its share of the profiled
total, and the share of convolutions (forward and backward) together: the part that only faster
arithmetic (bf16 units, a GPU) shortens.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from op_profile import profile_steps  # noqa: E402
from step_bench import ENGINE, build_variant  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="ours", choices=["ours", "reference"])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--precision", default=ENGINE["precision"], choices=["auto", "fp32", "bf16"])
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=ENGINE["channels_last"])
    p.add_argument("--compile", default=ENGINE["compile"], choices=["none", "default", "reduce-overhead", "aot_eager"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    return p


def main() -> None:
    args = build_parser().parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, ran = build_variant(args.variant, args.arch, device, args.batch, args.precision, args.channels_last,
                              args.compile)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    x2 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    for i in range(args.warmup):
        step(i, x1, x2)
    prof = profile_steps(step, x1, x2, args.warmup, args.steps)
    print(f"{args.variant}: {args.arch}, batch {args.batch}, {args.size} px, {ran['precision']} "
          f"({ran['precision_reason']}), {ran['layout']}, compile {ran['compile']}; {args.steps} profiled steps, "
          f"{prof.total_s:.2f} s/step of operator self time")
    print("\n".join(prof.top(args.top)))
    print(f"convolutions (forward and backward): {100 * prof.convolution_share:.1f}% of the operator self time, "
          f"{100 * (1 - prof.convolution_share):.1f}% outside them")


if __name__ == "__main__":
    main()
