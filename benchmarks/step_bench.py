"""Training-step throughput: lcr-fast against the reference's formulation, same model, batch and image size.

    python benchmarks/step_bench.py                          # CPU: ResNet-50 (no max-pool), batch 8, 112 px
    python benchmarks/step_bench.py --batch 128 --size 224   # one GPU

The reference side is lcr_fast.reference (a plain re-implementation of GANPerf/LCR's step: fp32
eager, EMA inside forward, its LARS). Ours is exactly what ``deepspeed lcr_fast/train.py`` runs: the
model, optimizer and DeepSpeed engine from the trainer's ``build_engine`` and its ``train_step``
(lcr_fast/loop.py), with the trainer's defaults unless a flag says otherwise (``engine.precision``
auto, ``engine.channels_last``, ``engine.compile``). Each variant runs in its own process so that its
peak memory (CUDA allocator peak, or peak RSS on CPU) is its own. Prints seconds per step, pairs/s,
peak memory, the precision and memory layout each side ran, the FLOPs of one step (torch's counter)
and the fraction of this machine's matmul peak (``peak.py``, measured in the same run) each side
reaches, and the ratios; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lcr_fast.config import DEFAULTS  # noqa: E402
from op_profile import profile_steps  # noqa: E402
from peak import machine_peaks, step_flops  # noqa: E402


Step = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
ENGINE = DEFAULTS["engine"]  # the trainer's defaults, which the benchmarks measure unless told otherwise
PROFILE_KEYS = ("op_s_per_step", "outside_conv_share", "top_ops")  # what a profiled run adds to its record


def build_variant(variant: str, arch: str, device: torch.device, batch: int, precision: str = ENGINE["precision"],
                  channels_last: bool = ENGINE["channels_last"], compile_mode: str = ENGINE["compile"],
                  size: int = 112) -> tuple[Step, dict]:
    """``step(i, view1, view2) -> loss`` of one variant, the reference's or the trainer's own, on images of
    ``size`` px, and what it runs: its precision (with the reason, for ours), memory layout and compile mode."""
    torch.manual_seed(0)
    if variant == "reference":
        from lcr_fast.reference import (ReferenceBYOL, ReferenceLARS, ReferenceResNet, ReferenceSchedule,
                                        reference_train_step)

        model = ReferenceBYOL(ReferenceResNet(arch, maxpool=False)).to(device).train()
        opt = ReferenceLARS(model, lr=0.3 * batch / 256)
        sched = ReferenceSchedule(opt, 10, 0.0, 800, 0.3 * batch / 256, 0.0, 100)
        ran = {"precision": "fp32", "precision_reason": "the reference: fp32 eager", "layout": "contiguous",
               "compile": "none (the reference: eager)"}
        return (lambda i, x1, x2: reference_train_step(model, opt, sched, x1, x2)["loss"]), ran

    from lcr_fast import engine as eng
    from lcr_fast.config import load_config
    from lcr_fast.host_memory import keep_freed_memory
    from lcr_fast.loop import StepParts, train_step
    from lcr_fast.optim import build_schedule
    from lcr_fast.selfcheck import check_compile
    from lcr_fast.train import build_engine

    backbone = "resnet50_cub200" if arch == "resnet50" else arch
    # strict: a benchmark measures the path it names, or fails (no fallback from bf16 to fp32).
    cfg = load_config(None, {"model": {"backbone": backbone, "maxpool": False, "pretrained": "none"},
                             "train": {"batch_size": batch},
                             "engine": {"precision": precision, "channels_last": channels_last,
                                        "compile": compile_mode, "strict": True}})
    info = eng.init_distributed(cfg.engine.dist_timeout_s)
    if info.device.type == "cpu":
        # What the trainer's start_process does; in --interleaved runs the reference, in the same process, gets it too.
        keep_freed_memory()
    choice = eng.choose_precision(precision, device, strict=True)
    model, engine, optimizer, _ = build_engine(cfg, info, choice.precision)
    # The trainer's start-up check compiles and runs the trunks; strict, a failure ends the benchmark.
    compiled = check_compile(model, compile_mode, batch, size, channels_last, choice.precision, device, strict=True)
    parts = StepParts(engine=engine, model=model, optimizer=optimizer, schedule=build_schedule(cfg, 100), pieces=1,
                      channels_last=channels_last)
    ran = {"precision": choice.precision, "precision_reason": choice.reason,
           "layout": "channels_last" if channels_last else "contiguous", "compile": compiled}
    return (lambda i, x1, x2: train_step(parts, [(x1, x2)], i).terms[0]), ran


def peak_memory(device: torch.device) -> int:
    """Bytes: the CUDA allocator's peak, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_variant(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, ran = build_variant(args.variant, args.arch, device, args.batch, args.precision, args.channels_last,
                              args.compile, args.size)
    g = torch.Generator(device="cpu").manual_seed(0)
    x1 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    x2 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    for i in range(args.warmup):
        step(i, x1, x2)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i, x1, x2)
    float(loss)  # waits for the device
    seconds = (time.perf_counter() - tic) / args.steps
    peak = peak_memory(device)
    flops = step_flops(lambda: step(args.warmup + args.steps, x1, x2))  # after the timing: the counter slows it
    # One profiled step after the timed ones (the profiler slows a step): where its operator time went.
    ops = profile_steps(step, x1, x2, args.warmup + args.steps + 1, 1) if args.profile else None
    return {"variant": args.variant, "device": device.type, "s_per_step": seconds, "pairs_per_s": args.batch / seconds,
            "peak_bytes": peak, "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
            "gflop_per_step": flops / 1e9, "gflops": flops / 1e9 / seconds,
            **({"op_s_per_step": ops.total_s, "outside_conv_share": 1 - ops.convolution_share,
                "top_ops": ops.top(8)} if ops else {}), **ran}


def interleaved(args) -> dict:
    """Both sides in this process, their steps in turns (reference, ours; then ours, reference; ...): on a
    machine whose speed drifts from minute to minute, each pair of steps meets the same conditions, so the
    ratio of the medians is steadier than that of two separate runs. No peak memory (one process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    x1 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    x2 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    steps, ran = {}, {}
    for variant in ("reference", "ours"):
        steps[variant], ran[variant] = build_variant(variant, args.arch, device, args.batch, args.precision,
                                                     args.channels_last, args.compile, args.size)
        for i in range(args.warmup):
            steps[variant](i, x1, x2)
    times = {"reference": [], "ours": []}
    for i in range(args.steps):
        for variant in ("reference", "ours") if i % 2 == 0 else ("ours", "reference"):
            tic = time.perf_counter()
            float(steps[variant](args.warmup + i, x1, x2))  # waits for the device
            times[variant].append(time.perf_counter() - tic)
    median = {v: statistics.median(t) for v, t in times.items()}
    pairs = [r / o for r, o in zip(times["reference"], times["ours"])]
    for variant in ("reference", "ours"):
        print(f"{variant:>9}: {median[variant]:.3f} s/step median of {args.steps} "
              f"({min(times[variant]):.3f}-{max(times[variant]):.3f}); {ran[variant]['precision']}, "
              f"{ran[variant]['layout']}, compile {ran[variant]['compile']}")
    speedup = median["reference"] / median["ours"]
    print(f"step speedup ours/reference, interleaved: {speedup:.2f}x (step pairs: {min(pairs):.2f}-{max(pairs):.2f}x)")
    return {"interleaved": True, "s_per_step": median, "step_times": times, "speedup": speedup,
            "pair_speedups": pairs, "ran": ran}


def add_common_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    """The options the step and end-to-end benchmarks share (``--variant`` is how they call themselves)."""
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--precision", default=ENGINE["precision"], choices=["auto", "fp32", "bf16"],
                   help="ours, as engine.precision (default: the trainer's, auto); the reference stays fp32")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)


def run_variant(cmd: list[str], variant: str) -> dict:
    """One variant in its own process, so that its peak memory is its own; it prints its JSON last."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(variant: str, r: dict, peaks: dict[str, dict]) -> str:
    """One side's line: its speed, memory, what it ran and the share of the machine's peak it reaches."""
    share = r["gflops"] / peaks[r["precision"]]["gflops"]
    ops = (f"\n{'':>11}profiled step: {r['op_s_per_step']:.3f} s of operator self time, "
           f"{100 * r['outside_conv_share']:.1f}% of it outside the convolutions" if "op_s_per_step" in r else "")
    return (f"{variant:>9}: {r['s_per_step']:.3f} s/step  {r['pairs_per_s']:.2f} pairs/s  "
            f"peak {r['peak_bytes'] / 2**20:.0f} MiB ({r['peak_kind']})\n"
            f"{'':>11}{r['precision']} ({r['precision_reason']}), {r['layout']}, compile {r['compile']}; "
            f"{r['gflop_per_step']:.1f} GFLOP/step, "
            f"{r['gflops']:.1f} GFLOP/s = {100 * share:.0f}% of this machine's {r['precision']} matmul peak" + ops)


def measure_peaks(device: torch.device) -> dict[str, dict]:
    """The matmul probe, printed, in the same run as the benchmark it scales."""
    peaks = machine_peaks(device)
    shown = ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s ({v['n']}^3)" for k, v in peaks.items())
    print(f"matmul peak on {device.type}: {shown}")
    return peaks


def report(results: dict, args: argparse.Namespace, config_keys: tuple[str, ...], what: str) -> None:
    """Ratios of ours over the reference (same batch, so step time and pairs/s give the same speed-up) when
    both ran, printed and, with ``--json``, written with the figures of each."""
    results["config"] = {k: getattr(args, k) for k in config_keys}
    peaks = results.get("machine_peak", {})
    for variant in ("reference", "ours"):
        if variant in results and peaks:
            results[variant]["peak_fraction"] = results[variant]["gflops"] / peaks[results[variant]["precision"]][
                "gflops"]
    if "reference" in results:
        ours, ref = results["ours"], results["reference"]
        results["speedup"] = ref["s_per_step"] / ours["s_per_step"]
        results["memory_ratio"] = ours["peak_bytes"] / ref["peak_bytes"]
        print(f"{what} speedup ours/reference: {results['speedup']:.2f}x   "
              f"peak memory ours/reference: {results['memory_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    add_common_arguments(p, steps=5)
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=ENGINE["channels_last"],
                   help="ours with engine.channels_last (default: the trainer's); the reference stays contiguous")
    p.add_argument("--compile", default=ENGINE["compile"], choices=["none", "default", "reduce-overhead", "aot_eager"],
                   help="torch.compile our ResNet trunks, as engine.compile (reduce-overhead: with CUDA graphs)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="after the timed steps, profile one more: the share of operator time outside convolutions")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the reference (--no-reference: ours alone, e.g. a second, compiled run)")
    p.add_argument("--interleaved", action="store_true",
                   help="both sides in one process, their steps in turns: a steadier ratio on a noisy machine, "
                        "no peak memory and no profile")
    p.add_argument("--rounds", type=int, default=1,
                   help="run both sides this many times, in turns, and report each round's ratio and the medians "
                        "(a shared, noisy machine)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"machine_peak": measure_peaks(device)}
    if args.interleaved:
        results.update(interleaved(args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    variants = ("reference", "ours") if args.reference else ("ours",)
    rounds = []
    for number in range(args.rounds):
        # Each round runs both sides back to back, in turns (a drift of a shared machine hits both alike);
        # only the first profiles.
        ran = {}
        for variant in variants if number % 2 == 0 else variants[::-1]:
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--arch", args.arch,
                   "--batch", str(args.batch), "--size", str(args.size), "--precision", args.precision,
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--profile" if args.profile and number == 0 else "--no-profile"]
            cmd += ["--channels_last" if args.channels_last else "--no-channels_last", "--compile", args.compile]
            ran[variant] = run_variant(cmd, variant)
        rounds.append(ran)
    for variant in variants:
        # The round with the median time of this side stands for it, with the first round's profile.
        times = sorted(r[variant]["s_per_step"] for r in rounds)
        median = next(r[variant] for r in rounds if r[variant]["s_per_step"] == times[(len(times) - 1) // 2])
        results[variant] = {**{k: v for k, v in rounds[0][variant].items() if k in PROFILE_KEYS}, **median,
                            "s_per_step_rounds": [r[variant]["s_per_step"] for r in rounds]}
        print(describe(variant, results[variant], results["machine_peak"]))
    if args.reference and args.rounds > 1:
        ratios = [r["reference"]["s_per_step"] / r["ours"]["s_per_step"] for r in rounds]
        results["speedup_rounds"] = ratios
        print(f"{args.rounds} rounds, step speedup of each: {' '.join(f'{x:.2f}x' for x in ratios)} "
              f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x); the line below is of the median times")
    report(results, args, ("arch", "batch", "size", "precision", "channels_last", "compile", "steps", "warmup",
                           "rounds"), "step")


if __name__ == "__main__":
    main()
