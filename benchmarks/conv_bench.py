"""The weight gradients of a ResNet trunk's stride-1 convolutions: matrix products against oneDNN, on the CPU.

    python benchmarks/conv_bench.py                     # ResNet-50 without max-pool, batch 8, 112 px
    python benchmarks/conv_bench.py --arch resnet18 --repeats 9

Computes the weight gradient of every convolution of one forward of the trunk (``lcr_fast.models.backbone``)
that ``kernels.conv2d`` takes over, at its own shape, as ``weight_grad_gemm`` and as ATen's
``weight_grad_torch`` (oneDNN), in turns, each the median of ``--repeats`` timings, and prints per shape the
milliseconds and GFLOP/s of each; then one forward and backward of the whole trunk with the op on and
switched off, in turns (``--trunk_rounds``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcr_fast.host_memory import keep_freed_memory  # noqa: E402
from lcr_fast.kernels import BACKEND  # noqa: E402
from lcr_fast.models.backbone import build_backbone  # noqa: E402

conv2d = importlib.import_module("lcr_fast.kernels.conv2d")


def build_trunk(arch: str) -> torch.nn.Module:
    return build_backbone("resnet50_cub200" if arch == "resnet50" else arch,
                          maxpool=arch != "resnet50").train().to(memory_format=torch.channels_last)


def trunk_sites(trunk: torch.nn.Module, batch: int, size: int) -> list[tuple[tuple[int, ...], int, int, int]]:
    """(input shape, output channels, kernel size, count) of every convolution of one trunk forward whose weight
    gradient ``kernels.conv2d`` computes."""
    sites: dict = {}
    backbone = importlib.import_module("lcr_fast.models.backbone")
    real = backbone.conv2d

    def record(conv, x):
        if conv2d.gemm_applies(conv, x):
            key = (tuple(x.shape), conv.out_channels, conv.kernel_size[0])
            sites[key] = sites.get(key, 0) + 1
        return conv(x)

    backbone.conv2d = record
    try:
        trunk(torch.zeros(batch, 3, size, size).contiguous(memory_format=torch.channels_last))
    finally:
        backbone.conv2d = real
    return [(*key, count) for key, count in sites.items()]


def in_turns(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turns ``repeats`` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def time_site(shape: tuple[int, ...], c_out: int, kernel: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape[0], c_out, *shape[2:], generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, shape[1], kernel, kernel, generator=g).contiguous(memory_format=torch.channels_last)
    return in_turns({"gemm": lambda: conv2d.weight_grad_gemm(grad, x, kernel),
                     "onednn": lambda: conv2d.weight_grad_torch(grad, x, weight, kernel // 2)}, repeats)


def time_trunk(trunk: torch.nn.Module, batch: int, size: int, rounds: int) -> dict[str, float]:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)

    def step(switched_off: bool) -> None:
        with BACKEND.using():
            if switched_off:
                BACKEND.disable(conv2d.OP, "conv_bench: oneDNN's weight gradient")
            trunk(x).sum().backward()
        trunk.zero_grad(set_to_none=True)

    return in_turns({"gemm": lambda: step(False), "onednn": lambda: step(True)}, rounds)


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--trunk_rounds", type=int, default=5, help="0 skips the whole-trunk timing")
    return p


def main() -> None:
    args = build_parser().parse_args()
    keep_freed_memory()  # as the trainer does on the CPU: the padded copies would otherwise fault in afresh each call
    trunk = build_trunk(args.arch)
    print(f"{args.arch}, batch {args.batch}, {args.size} px, fp32, channels_last; {torch.get_num_threads()} threads; "
          f"weight gradient ms per call, median of {args.repeats} in turns")
    print(f"{'input':>22} {'out':>5} {'k':>2} {'calls':>5}  {'gemm ms':>8} {'GFLOP/s':>7}  {'oneDNN ms':>9} "
          f"{'GFLOP/s':>7}  {'ratio':>5}")
    totals = {"gemm": 0.0, "onednn": 0.0}
    for shape, c_out, kernel, count in trunk_sites(trunk, args.batch, args.size):
        t = time_site(shape, c_out, kernel, args.repeats)
        flop = 2 * shape[0] * shape[2] * shape[3] * shape[1] * c_out * kernel * kernel
        for name in totals:
            totals[name] += count * t[name]
        rates = {name: flop / t[name] / 1e9 for name in t}
        print(f"{str(shape):>22} {c_out:>5} {kernel:>2} {count:>5}  {1e3 * t['gemm']:8.2f} {rates['gemm']:7.0f}  "
              f"{1e3 * t['onednn']:9.2f} {rates['onednn']:7.0f}  {t['onednn'] / t['gemm']:5.2f}")
    print(f"one trunk pass's weight gradients: gemm {1e3 * totals['gemm']:.1f} ms, oneDNN "
          f"{1e3 * totals['onednn']:.1f} ms ({totals['onednn'] / totals['gemm']:.2f}x)")
    if args.trunk_rounds > 0:
        t = time_trunk(trunk, args.batch, args.size, args.trunk_rounds)
        print(f"whole trunk forward and backward, median of {args.trunk_rounds} in turns: gemm {t['gemm']:.3f} s, "
              f"oneDNN {t['onednn']:.3f} s ({t['onednn'] / t['gemm']:.2f}x)")


if __name__ == "__main__":
    main()
