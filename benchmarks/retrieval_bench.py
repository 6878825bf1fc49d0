"""Time retrieval_metrics against the reference's per-query retrieval loop.

    python benchmarks/retrieval_bench.py                       # N=1000, D=2048, 100 classes, CPU
    python benchmarks/retrieval_bench.py --n 8041 --device cuda --json out.json
    python benchmarks/retrieval_bench.py --counting search     # force one of the two counting paths

The machine's load average is printed with the figures: on a shared CPU both timings stretch
(multi-threaded kernels wait for cores), so take figures from a quiet moment, best of several runs.

The reference loop below re-implements ``validate`` of GANPerf/LCR ``main_moco.py`` step for
step: per query it copies the other N-1 rows, scores them with ``torch.mv``, moves the scores to
numpy and sorts them there.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from lcr_fast.eval import retrieval as retrieval_module
from lcr_fast.eval import retrieval_metrics


def reference_loop(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = features.shape[0]
    labels = labels.float()  # the reference concatenates its labels onto a float tensor
    top1, top5, aps = [], [], []
    for j in range(n):
        others = torch.arange(n) != j
        bank, bank_labels = features[others], labels[others]
        similarity = torch.mv(bank, features[j])
        table = torch.zeros(n - 1, 2)
        table[:, 0] = similarity
        table[:, 1] = bank_labels
        table = table.cpu().numpy()
        ranked = table[np.argsort(table[:, 0])[::-1]]
        query_label = labels[j].item()
        top1.append(1 if ranked[0, 1] == query_label else 0)
        top5.append(1 if np.sum(ranked[:5, -1] == query_label) > 0 else 0)
        positives = np.where(ranked[:, 1] == query_label)[0]
        ap = 0.0
        for i, rank0 in enumerate(positives):
            ap += (i + 1) / (rank0 + 1)
        aps.append(ap / len(positives))
    return {"rank1": float(np.mean(top1)), "rank5": float(np.mean(top5)), "mAP": float(np.mean(aps))}


def timed(fn, *args) -> tuple[float, dict[str, float]]:
    if args[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the reference loop; the fastest counts (shared machines)")
    parser.add_argument("--ours_repeats", type=int, default=20,
                        help="runs of retrieval_metrics (cheap); the fastest counts")
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--counting", choices=("auto", "compare", "search"), default="auto",
                        help="retrieval_metrics' way of counting items above each positive (auto: by class size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures to this path")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(args.n, args.dim, generator=generator), dim=1).to(args.device)
    # Every class gets members: the reference loop would divide by zero on a singleton.
    labels = (torch.randperm(args.n, generator=generator) % args.classes).to(args.device)

    if args.counting != "auto":
        retrieval_module.COMPARE_MAX_CLASS_SIZE = 2**62 if args.counting == "compare" else 0

    def ours_fn(feats, labs):
        return retrieval_metrics(feats, labs, chunk_size=args.chunk_size)

    load_before = os.getloadavg()
    ours_fn(features, labels)  # warm-up: allocator, kernels
    ours = min((timed(ours_fn, features, labels) for _ in range(args.ours_repeats)), key=lambda run: run[0])
    reference = min((timed(reference_loop, features, labels) for _ in range(args.repeats)), key=lambda run: run[0])
    load_after = os.getloadavg()
    for key in reference[1]:
        assert abs(ours[1][key] - reference[1][key]) < 1e-5, (key, ours[1], reference[1])

    figures = {
        "n": args.n,
        "dim": args.dim,
        "classes": args.classes,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "counting": args.counting,
        "load_average_1min": [load_before[0], load_after[0]],
        "reference_s": reference[0],
        "retrieval_metrics_s": ours[0],
        "speedup": reference[0] / ours[0],
        "metrics": ours[1],
    }
    print(f"N={args.n} D={args.dim} classes={args.classes} device={args.device} threads={figures['threads']} "
          f"counting={args.counting} load average (1 min) {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"reference per-query loop: {reference[0]:8.3f} s  (best of {args.repeats})")
    print(f"retrieval_metrics:        {ours[0]:8.3f} s  (best of {args.ours_repeats})")
    print(f"speedup:                  {figures['speedup']:8.1f}x   metrics agree: {ours[1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
