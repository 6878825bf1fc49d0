"""Two-view training throughput: the DALI loader against the reference's torchvision pipeline.

    python benchmarks/data_bench.py                                  # synthetic CUB-like JPEGs, 224 px, 2 threads
    python benchmarks/data_bench.py --grain 0                        # the same drawings in flat colours (~10 KB files)
    python benchmarks/data_bench.py --data_dir /data/CUB --threads 8 --batch_size 64 --steps 30 --json out.json

Both loaders read the same JPEGs with the same recipe, image size, batch size and thread count
(DALI threads vs. DataLoader workers). The first batch of each pass is left out of the timing
(worker start-up, pipeline build, page cache); the loaders take turns for ``--repeats`` passes and
the best pass of each counts. Wall-clock pairs/s is what training sees, but on a shared machine it
moves with the neighbours' load; the CPU time per pair (this process and its workers, all threads)
moves much less, so it is reported too, with the load average. On a machine with a GPU the DALI
``mixed`` path (nvJPEG + GPU augmentation) is measured as well.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import psutil
import torch

from lcr_fast.data import scan_split
from lcr_fast.data.dali import DaliTrainLoader
from lcr_fast.data.synthetic import PHOTO_GRAIN, write_dataset
from lcr_fast.data.torch_loader import TorchTrainLoader


def cpu_seconds() -> float:
    """User + system time of this process and its live children (DataLoader workers)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(loader, steps: int, sync: bool) -> tuple[float, float]:
    """(pairs/s, CPU ms per pair) over ``steps`` batches after a first, untimed one."""
    batches = iter(loader)
    next(batches)
    start, cpu = time.perf_counter(), cpu_seconds()
    pairs = 0
    for _ in range(steps):
        view1, _, _ = next(batches)
        pairs += view1.shape[0]
    if sync:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return pairs / wall, 1000 * cpu / pairs


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", help="ImageFolder root with a train/ split (default: synthetic 500x375 JPEGs)")
    parser.add_argument("--grain", type=float, default=PHOTO_GRAIN,
                        help="luminance noise of the synthetic JPEGs, grey levels "
                             "(default: photo-like files of ~70 KB)")
    parser.add_argument("--recipe", default="byol", choices=("byol", "mocov2"))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed batches per loader")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per loader (best counts)")
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            num_classes = 10
            per_class = -(-(args.steps + 1) * args.batch_size // num_classes)
            data_dir = write_dataset(tmp, num_classes, per_class, 1, image_size=(500, 375), seed=0, grain=args.grain)
        index = scan_split(data_dir, "train")
        jpeg_kb = sum(os.path.getsize(path) for path, _ in index.samples) / len(index) / 1024
        steps_per_epoch = len(index) // args.batch_size
        if steps_per_epoch < args.steps + 1:
            parser.error(f"{len(index)} images give {steps_per_epoch} batches of {args.batch_size}; "
                         f"--steps needs {args.steps + 1}")

        common = dict(recipe=args.recipe, batch_size=args.batch_size, image_size=args.image_size, seed=0)
        results = {"images": len(index), "mean_jpeg_kb": jpeg_kb, "recipe": args.recipe, "image_size": args.image_size,
                   "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps}
        torch.set_num_threads(args.threads)
        loaders = {
            "torchvision": (TorchTrainLoader(index, device="cpu", num_workers=args.threads, **common), False),
            "dali_cpu": (DaliTrainLoader(index, device="cpu", num_threads=args.threads, **common), False),
        }
        if torch.cuda.is_available():
            loaders["dali_mixed"] = (DaliTrainLoader(index, device=torch.device("cuda", 0), num_threads=args.threads,
                                                     **common), True)
        rate, cpu = dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, float("inf"))
        for _ in range(args.repeats):
            for name, (loader, sync) in loaders.items():
                pairs_per_s, cpu_ms = measure(loader, args.steps, sync)
                rate[name], cpu[name] = max(rate[name], pairs_per_s), min(cpu[name], cpu_ms)
        for name in loaders:
            results[f"{name}_pairs_per_s"] = rate[name]
            results[f"{name}_cpu_ms_per_pair"] = cpu[name]
            if name != "torchvision":
                results[f"{name}_speedup"] = rate[name] / rate["torchvision"]
                results[f"{name}_cpu_time_speedup"] = cpu["torchvision"] / cpu[name]
        results["load_average_1min"] = os.getloadavg()[0]

    for key, value in results.items():
        print(f"{key:>26}: {value:.2f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
