"""BatchNorm + residual add + ReLU of a ResNet trunk in training: the fused CPU operator against ATen's ops.

    python benchmarks/batch_norm_bench.py                      # ResNet-50 without max-pool, batch 8, 112 px
    python benchmarks/batch_norm_bench.py --arch resnet18 --precision bf16

Runs every BatchNorm of one forward of the trunk (``lcr_fast.models.backbone``) at its own shape, forward
and backward, as ``kernels.batch_norm_act`` (fused) and as ``batch_norm_act_torch`` (torchvision's ops),
each the median of ``--repeats`` timings, and prints per shape and for the whole trunk the milliseconds
of each and the ratio. Inputs rotate through several copies so that a timing does not find its tensors
in the cache from the previous one.
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

from lcr_fast.kernels import BACKEND  # noqa: E402
from lcr_fast.models.backbone import build_backbone  # noqa: E402

bna = importlib.import_module("lcr_fast.kernels.batch_norm_act")
COPIES = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def trunk_sites(arch: str, batch: int, size: int) -> list[tuple[tuple[int, ...], bool, bool, int]]:
    """(input shape, residual, relu, count) of every batch_norm_act call in one forward of the trunk."""
    trunk = build_backbone("resnet50_cub200" if arch == "resnet50" else arch, maxpool=arch != "resnet50").train()
    sites: dict = {}
    real = bna.batch_norm_act

    def record(x, bn, residual=None, relu=True):
        key = (tuple(x.shape), residual is not None, relu)
        sites[key] = sites.get(key, 0) + 1
        return bna.batch_norm_act_torch(x, bn, residual, relu)

    backbone = importlib.import_module("lcr_fast.models.backbone")
    backbone.batch_norm_act = record
    try:
        with torch.no_grad():
            trunk(torch.zeros(batch, 3, size, size))
    finally:
        backbone.batch_norm_act = real
    return [(*key, count) for key, count in sites.items()]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def time_site(shape: tuple[int, ...], residual: bool, relu: bool, dtype: torch.dtype, fused: bool,
              repeats: int) -> tuple[float, float]:
    """Forward and backward milliseconds of one call at ``shape``."""
    g = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(shape[1])
    xs = [torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
          for _ in range(COPIES)]
    rs = [torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
          for _ in range(COPIES)] if residual else [None] * COPIES
    grads = [torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
             for _ in range(COPIES)]
    turn = iter(range(10**9))
    mode = "auto" if fused else "torch"

    def forward():
        i = next(turn) % COPIES
        with BACKEND.using(mode):
            return bna.batch_norm_act(xs[i], bn, rs[i], relu)

    forward_ms = median_ms(forward, repeats)
    with BACKEND.using(mode):
        outs = [bna.batch_norm_act(xs[i], bn, rs[i], relu) for i in range(COPIES)]

    def backward():
        i = next(turn) % COPIES
        torch.autograd.grad(outs[i], [xs[i]] + ([rs[i]] if residual else []), grads[i], retain_graph=True)

    return forward_ms, median_ms(backward, repeats)


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=15)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if not bna.operator_available():
        sys.exit("the fused operator could not be built here (see torch.utils.cpp_extension's error above)")
    dtype = DTYPES[args.precision]
    totals = {"fused": [0.0, 0.0], "aten": [0.0, 0.0]}
    print(f"{args.arch}, batch {args.batch}, {args.size} px, {args.precision}, channels_last; "
          f"{torch.get_num_threads()} threads; ms per call, median of {args.repeats}")
    print(f"{'shape':>22} {'add':>4} {'relu':>4} {'calls':>5}  {'fwd fused':>9} {'fwd aten':>9}  "
          f"{'bwd fused':>9} {'bwd aten':>9}")
    for shape, residual, relu, count in trunk_sites(args.arch, args.batch, args.size):
        fused = time_site(shape, residual, relu, dtype, True, args.repeats)
        aten = time_site(shape, residual, relu, dtype, False, args.repeats)
        for name, (fwd, bwd) in (("fused", fused), ("aten", aten)):
            totals[name][0] += count * fwd
            totals[name][1] += count * bwd
        print(f"{str(shape):>22} {'yes' if residual else 'no':>4} {'yes' if relu else 'no':>4} {count:>5}  "
              f"{fused[0]:9.2f} {aten[0]:9.2f}  {fused[1]:9.2f} {aten[1]:9.2f}")
    (ff, fb), (af, ab) = totals["fused"], totals["aten"]
    print(f"one trunk pass: forward fused {ff:.1f} ms, aten {af:.1f} ms ({af / ff:.2f}x); "
          f"backward fused {fb:.1f} ms, aten {ab:.1f} ms ({ab / fb:.2f}x)")


if __name__ == "__main__":
    main()
