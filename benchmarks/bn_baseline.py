"""How much of a run's kNN gain needs no training: the untrained network once its BatchNorm statistics
are computed on the training images.

    python benchmarks/bn_baseline.py --data_dir demo_seeds/data                  # configs/demo.yaml, seeds 0 1 2
    python benchmarks/bn_baseline.py --config configs/demo.yaml --data_dir demo_seeds/data --seeds 0

The untrained figure the trainer prints (evaluated before the first step) comes from a network whose
BatchNorm layers still hold their initial statistics (mean 0, variance 1), so they pass activations
through unscaled. The first optimizer steps replace those statistics with the data's, which changes the
features without any gradient. This builds the model as ``lcr_fast/train.py`` does at each seed (one
rank), evaluates it with the trainer's loaders and kNN rule, then runs the training images through it
in train mode without gradients (cumulative BatchNorm averages, no parameter changes) and evaluates it
again. A trained run's kNN top-1 near the second figure learned little beyond those statistics.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lcr_fast.config import load_config  # noqa: E402
from lcr_fast.data import build_eval_loader, scan_split  # noqa: E402
from lcr_fast.eval.features import evaluate  # noqa: E402
from lcr_fast.models import build_model  # noqa: E402
from lcr_fast.train import seed_process  # noqa: E402


def calibrate_batchnorm(model: nn.Module, loader) -> None:
    """Replace every BatchNorm's running statistics by their averages over ``loader``'s images (one pass
    of the model's ``extract`` in train mode, no gradient); parameters do not change."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch weighs alike
    model.train()
    try:
        with torch.no_grad():
            for images, _ in loader:
                model.extract(images)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def seed_row(config_path: str, data_dir: str, seed: int, backend: str | None = None) -> dict[str, float]:
    """kNN top-1 of the untrained model at ``seed`` before and after ``calibrate_batchnorm``."""
    cfg = load_config(config_path, {"seed": seed})
    seed_process(seed)  # as lcr_fast/train.py's rank 0 before it builds the model
    model = build_model(cfg)
    batch, size, threads = cfg.train.batch_size, cfg.dataset.image_size, cfg.dataset.num_workers
    path = backend or cfg.data.backend
    bank = scan_split(data_dir, "train")
    memory = build_eval_loader(data_dir, "train", batch, size, path, "cpu", threads, index=bank)
    test = build_eval_loader(data_dir, "test", batch, size, path, "cpu", threads)
    k = min(cfg.train.knn_k, len(bank))  # as the trainer caps it
    untrained = evaluate(model, memory, test, k, cfg.train.knn_t, retrieval=False)["knn_top1"]
    calibrate_batchnorm(model, memory)
    calibrated = evaluate(model, memory, test, k, cfg.train.knn_t, retrieval=False)["knn_top1"]
    return {"seed": seed, "untrained": untrained, "bn_calibrated": calibrated}


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "demo.yaml"))
    parser.add_argument("--data_dir", required=True, help="the ImageFolder dataset the runs trained on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backend", help="data path for the loaders (default: the config's data.backend)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print("| seed | kNN top-1 untrained | kNN top-1 untrained, BatchNorm statistics of the training images |")
    print("| --- | --- | --- |")
    for seed in args.seeds:
        row = seed_row(args.config, args.data_dir, seed, args.backend)
        print(f"| {seed} | {row['untrained']:.2f} | {row['bn_calibrated']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
