"""Run every benchmark, then write one JSON of their figures and a PNG chart of the speed-ups.

    python benchmarks/run.py                       # CPU defaults of each benchmark
    python benchmarks/run.py --out bench_results   # folder for results.json and speedups.png

Each benchmark runs as its own process with ``--json``; one that fails is recorded with its error
and the others still run. The kernel benchmark needs CUDA and says so (exit 0) elsewhere.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = {
    "step": ["step_bench.py"],
    "data": ["data_bench.py", "--repeats", "3"],
    "end_to_end": ["e2e_bench.py"],
    "retrieval": ["retrieval_bench.py"],
    "kernels": ["kernel_bench.py"],
}

KERNEL_MODE = "fwd+bwd"  # the kernel rows the chart shows (forward and backward together)


def _speedups(results: dict) -> dict[str, float]:
    """The ours-over-reference ratios the chart shows, by label."""
    out = {}
    step = results.get("step", {}).get("figures", {})
    if "speedup" in step:
        out["training step"] = step["speedup"]
    data = results.get("data", {}).get("figures", {})
    for key, label in (("dali_cpu_speedup", "data (DALI CPU)"), ("dali_mixed_speedup", "data (DALI mixed)")):
        if key in data:
            out[label] = data[key]
    e2e = results.get("end_to_end", {}).get("figures", {})
    if "speedup" in e2e:
        out["end to end"] = e2e["speedup"]
    retrieval = results.get("retrieval", {}).get("figures", {})
    if "speedup" in retrieval:
        out["retrieval"] = retrieval["speedup"]
    for row in results.get("kernels", {}).get("figures", {}).get("rows", []):
        if row.get("mode") == KERNEL_MODE:
            out[f"kernel {row['op']}"] = row["speedup"]
    return out


def machine() -> str:
    """The GPU, or the CPU's model name and core count: what the chart's figures were measured on."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def _title(results: dict) -> str:
    """What ran: the machine and the precision of each side of the step."""
    step = results.get("step", {}).get("figures", {})
    ran = ""
    if "ours" in step:
        ran = f"; step: ours {step['ours']['precision']}, reference {step['reference']['precision']}"
    return f"{machine()}{ran}"


def _chart(speedups: dict[str, float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = list(speedups), list(speedups.values())
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4))
    # Bars start at 1x (no change); on a log axis a 1.2x step stays visible next to a 90x retrieval.
    ax.barh(labels, [v - 1 for v in values], left=1, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_xscale("log")
    ax.set_xlim(min(0.8, min(values) / 1.2), max(values) * 2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    # Each label right of the bar's far end or of the 1x line, so that a bar below 1x keeps it off the axis labels.
    for y, v in enumerate(values):
        ax.text(max(v, 1.0) * 1.04, y, f"{v:.2f}x", va="center")
    ax.set_xlabel("lcr-fast / reference (higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results", help="folder for results.json and speedups.png")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    return p


def main() -> None:
    args = build_parser().parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name, argv in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        json_path = os.path.join(args.out, f"{name}.json")
        print(f"== {name} ==", flush=True)
        tic = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:], "--json", json_path],
                              capture_output=True, text=True)
        print(proc.stdout[-3000:], flush=True)
        entry = {"seconds": round(time.perf_counter() - tic, 1), "returncode": proc.returncode}
        if proc.returncode:
            entry["error"] = proc.stderr[-2000:]
        if os.path.exists(json_path):
            with open(json_path) as f:
                entry["figures"] = json.load(f)
        results[name] = entry
    speedups = _speedups(results)
    results["speedups"] = speedups
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if speedups:
        _chart(speedups, os.path.join(args.out, "speedups.png"), _title(results))
    print(f"results in {args.out}/results.json" + (f" and {args.out}/speedups.png" if speedups else ""))
    if any(entry.get("returncode") for entry in results.values() if isinstance(entry, dict) and "returncode" in entry):
        sys.exit(1)


if __name__ == "__main__":
    main()
