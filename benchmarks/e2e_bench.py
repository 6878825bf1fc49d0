"""End-to-end training throughput: loader and step together, lcr-fast against the reference's formulation.

    python benchmarks/e2e_bench.py                                   # CPU: ResNet-18, batch 8, 112 px
    python benchmarks/e2e_bench.py --arch resnet50 --batch 128 --size 224 --threads 16   # one GPU

Ours: the DALI loader (``mixed`` on a GPU) feeding the trainer's own step (``build_engine`` and
``train_step``: DeepSpeed engine, the trainer's defaults for precision, memory layout, loader threads
and torch's threads unless a flag says otherwise). The reference: its torchvision/PIL pipeline in
DataLoader workers (``dataset.num_workers`` of them, as its YAML files say) feeding its fp32 eager
step (lcr_fast.reference). Both read the same synthetic CUB-like JPEGs (500x375, photo-like grain)
or ``--data_dir``, each in its own process (peak memory is its own). Where DALI cannot be imported
(the lent GPU machine has none), ours runs its step behind the torchvision loader instead and the
line says so: a lower bound of the DALI figure, measured rather than composed from parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lcr_fast.config import DEFAULTS  # noqa: E402
from peak import step_flops  # noqa: E402
from step_bench import (add_common_arguments, build_variant, describe, measure_peaks, peak_memory, report,  # noqa: E402
                        run_variant)


def _run_variant(args) -> dict:
    from lcr_fast.data import build_train_loader, resolve_backend, scan_split

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = scan_split(args.data_dir, "train")
    backend = "torchvision" if args.variant == "reference" else resolve_backend("dali")
    loader = build_train_loader(index.root, "byol", args.batch, args.size, backend, device, args.threads, 0,
                                index=index)
    step, ran = build_variant(args.variant, args.arch, device, args.batch, args.precision, size=args.size)
    batches = iter(loader)
    for i in range(args.warmup):
        x1, x2, _ = next(batches)
        step(i, x1, x2)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for i in range(args.steps):
        x1, x2, _ = next(batches)
        loss = step(args.warmup + i, x1, x2)
    float(loss)
    seconds = (time.perf_counter() - tic) / args.steps
    peak = peak_memory(device)
    x1, x2, _ = next(batches)
    flops = step_flops(lambda: step(args.warmup + args.steps, x1, x2))  # the step's share, counted after the timing
    return {"variant": args.variant, "loader": backend, "device": device.type, "s_per_step": seconds,
            "pairs_per_s": args.batch / seconds, "peak_bytes": peak,
            "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
            "dali_missing": args.variant == "ours" and backend != "dali", "gflop_per_step": flops / 1e9,
            "gflops": flops / 1e9 / seconds, "torch_threads": torch.get_num_threads(), **ran}


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", help="ImageFolder root with train/ (default: synthetic 500x375 JPEGs)")
    p.add_argument("--arch", default="resnet18", choices=["resnet50", "resnet18"])
    add_common_arguments(p, steps=6)
    p.add_argument("--threads", type=int, default=DEFAULTS["dataset"]["num_workers"],
                   help="DALI threads / DataLoader workers (default: the trainer's dataset.num_workers)")
    p.add_argument("--torch_threads", type=int, default=0,
                   help="torch's intra-op threads in both processes (default 0: as the trainer leaves them)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            from lcr_fast.data.synthetic import PHOTO_GRAIN, write_dataset

            per_class = -(-(args.steps + args.warmup + 2) * args.batch // 10)
            data_dir = write_dataset(tmp, 10, per_class, 1, image_size=(500, 375), seed=0, grain=PHOTO_GRAIN)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results = {"machine_peak": measure_peaks(device)}
        for variant in ("reference", "ours"):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--data_dir", str(data_dir),
                   "--arch", args.arch, "--batch", str(args.batch), "--size", str(args.size),
                   "--precision", args.precision,
                   "--threads", str(args.threads), "--torch_threads", str(args.torch_threads),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            results[variant] = r = run_variant(cmd, variant)
            label = " (DALI missing here: our step behind the torchvision loader)" if r["dali_missing"] else ""
            print(f"{describe(variant, r, results['machine_peak'])}\n{'':>11}loader {r['loader']} "
                  f"({args.threads} threads), torch {r['torch_threads']} threads{label}")
    report(results, args, ("arch", "batch", "size", "precision", "threads", "torch_threads", "steps", "warmup"),
           "end-to-end")


if __name__ == "__main__":
    main()
