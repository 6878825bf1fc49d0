"""The demo's learning, seed by seed: what `make demo` trains, once per seed, as one table.

    python benchmarks/demo_seeds.py                       # seeds 0 1 2, configs/demo.yaml, the demo's dataset
    python benchmarks/demo_seeds.py --seeds 0 --out demo_seeds

Writes the demo's synthetic dataset (lcr_fast.data.synthetic.DEMO) once, runs lcr_fast/train.py on it
for each seed (one process, as `make demo` runs it on one rank), and prints per seed: kNN top-1 of the
untrained network (evaluated before the first step) and after training, the ratio to it and to chance,
retrieval rank-1 and mAP before and after, the rationale KL over the first and the last tenth of the
logged steps, and the training minutes (first to last logged step). ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lcr_fast.data.synthetic import DEMO, write_dataset  # noqa: E402


def rationale_kl_ends(metrics: list[dict]) -> tuple[float, float]:
    """Mean rationale KL over the first and the last tenth (at least one) of the logged training steps."""
    kl = [m["rationale_loss"] for m in metrics if "rationale_loss" in m]
    n = max(1, len(kl) // 10)
    return sum(kl[:n]) / n, sum(kl[-n:]) / n


def seed_row(log_dir: str, seed: int) -> dict:
    with open(os.path.join(log_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    steps = [m for m in metrics if "ssl_loss" in m]
    kl_start, kl_end = rationale_kl_ends(metrics)
    untrained, chance = results["untrained"], 100 / results["num_classes"]
    return {"seed": seed, "untrained_knn": untrained["knn_top1"], "knn": results["knn_top1"],
            "x_untrained": results["knn_top1"] / untrained["knn_top1"], "x_chance": results["knn_top1"] / chance,
            "untrained_rank1": 100 * untrained["rank1"], "rank1": 100 * results["retrieval"]["rank1"],
            "untrained_mAP": 100 * untrained["mAP"], "mAP": 100 * results["retrieval"]["mAP"],
            "kl_start": kl_start, "kl_end": kl_end, "train_minutes": (steps[-1]["time"] - steps[0]["time"]) / 60,
            "steps": results["steps"], "chance": chance}


def markdown(rows: list[dict]) -> str:
    lines = ["| seed | kNN top-1 untrained -> trained | x untrained | x chance | rank-1 untrained -> trained | "
             "mAP untrained -> trained | rationale KL first -> last tenth | training minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['untrained_knn']:.2f} -> {r['knn']:.2f} | {r['x_untrained']:.2f} | "
                     f"{r['x_chance']:.2f} | {r['untrained_rank1']:.2f} -> {r['rank1']:.2f} | "
                     f"{r['untrained_mAP']:.2f} -> {r['mAP']:.2f} | {r['kl_start']:.3f} -> {r['kl_end']:.3f} | "
                     f"{r['train_minutes']:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo.yaml"))
    p.add_argument("--out", default="demo_seeds", help="folder for the dataset and one run folder per seed")
    p.add_argument("--json", default=None)
    return p


def main() -> None:
    args = build_parser().parse_args()
    data = os.path.join(args.out, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        write_dataset(data, **DEMO)
    rows = []
    for seed in args.seeds:
        run = os.path.join(args.out, f"seed{seed}")
        shutil.rmtree(run, ignore_errors=True)  # metrics.jsonl appends: a fresh folder per run
        cmd = [sys.executable, os.path.join(REPO, "lcr_fast", "train.py"), "-c", args.config, "--data_dir", data,
               "--log_dir", run, "--ckpt_dir", os.path.join(run, "ckpt"), "--hide_progress", f"seed={seed}"]
        print(f"seed {seed}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows.append(seed_row(run, seed))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
