"""Training-step throughput: lcr-fast against the reference's formulation, same model, batch and image size.

    python benchmarks/step_bench.py                          # CPU: ResNet-50 (no max-pool), batch 8, 112 px, fp32
    python benchmarks/step_bench.py --batch 128 --size 224 --precision bf16   # one GPU

The reference side is lcr_fast.reference (a plain re-implementation of GANPerf/LCR's step: fp32
eager, EMA inside forward, its LARS). Ours is the model, optimizer and step order train.py runs
(without the DeepSpeed wrapper, which is a pass-through at ZeRO stage 0 on one rank). Each variant
runs in its own process so that its peak memory (CUDA allocator peak, or peak RSS on CPU) is its own.
Prints seconds per step, pairs/s, peak memory and the ratios; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_variant(variant: str, arch: str, device: torch.device, batch: int):
    from lcr_fast.config import load_config
    from lcr_fast.models import build_model
    from lcr_fast.optim import WarmupCosineSchedule, build_optimizer
    from lcr_fast.reference import ReferenceBYOL, ReferenceLARS, ReferenceResNet, ReferenceSchedule

    torch.manual_seed(0)
    if variant == "reference":
        model = ReferenceBYOL(ReferenceResNet(arch, maxpool=False)).to(device).train()
        opt = ReferenceLARS(model, lr=0.3 * batch / 256)
        return model, opt, ReferenceSchedule(opt, 10, 0.0, 800, 0.3 * batch / 256, 0.0, 100)
    backbone = "resnet50_cub200" if arch == "resnet50" else arch
    cfg = load_config(None, {"model": {"backbone": backbone, "maxpool": False, "pretrained": "none"},
                             "train": {"batch_size": batch}})
    model = build_model(cfg).to(device).train()
    return model, build_optimizer(cfg, model), WarmupCosineSchedule(cfg, 100)


def _run_variant(args) -> dict:
    from lcr_fast.reference import reference_train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, opt, sched = build_variant(args.variant, args.arch, device, args.batch)
    fmt = torch.channels_last if args.channels_last and args.variant == "ours" else torch.contiguous_format
    if fmt is torch.channels_last:
        model.to(memory_format=fmt)
    g = torch.Generator(device="cpu").manual_seed(0)
    x1 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device).contiguous(memory_format=fmt)
    x2 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device).contiguous(memory_format=fmt)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" and args.variant == "ours"
           else contextlib.nullcontext())
    if args.variant == "ours":
        from lcr_fast.models import compile_backbones

        compile_backbones(model, args.compile)  # as engine.compile does

    def step(i: int) -> torch.Tensor:
        if args.variant == "reference":
            return reference_train_step(model, opt, sched, x1, x2)["loss"]
        sched.apply(opt, i)
        model.momentum_update()
        with amp:
            out = model(x1, x2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    float(loss)  # waits for the device
    seconds = (time.perf_counter() - tic) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "device": device.type, "s_per_step": seconds, "pairs_per_s": args.batch / seconds,
            "peak_bytes": peak, "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"}


def add_common_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    """The options the step and end-to-end benchmarks share (``--variant`` is how they call themselves)."""
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
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


def report(results: dict, args: argparse.Namespace, config_keys: tuple[str, ...], what: str) -> None:
    """Ratios of ours over the reference (same batch, so step time and pairs/s give the same speed-up),
    printed and, with ``--json``, written."""
    ours, ref = results["ours"], results["reference"]
    results["config"] = {k: getattr(args, k) for k in config_keys}
    results["speedup"] = ref["s_per_step"] / ours["s_per_step"]
    results["memory_ratio"] = ours["peak_bytes"] / ref["peak_bytes"]
    print(f"{what} speedup ours/reference: {results['speedup']:.2f}x   peak memory ours/reference: {results['memory_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    add_common_arguments(p, steps=5)
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="our model in channels_last, as engine.channels_last defaults (the reference stays contiguous)")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "aot_eager"],
                   help="torch.compile our ResNet trunks, as engine.compile (reduce-overhead: with CUDA graphs)")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return

    results = {}
    for variant in ("reference", "ours"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--arch", args.arch, "--batch", str(args.batch),
               "--size", str(args.size), "--precision", args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--channels_last" if args.channels_last else "--no-channels_last", "--compile", args.compile]
        results[variant] = r = run_variant(cmd, variant)
        print(f"{variant:>9}: {r['s_per_step']:.3f} s/step  {r['pairs_per_s']:.2f} pairs/s  peak {r['peak_bytes'] / 2**20:.0f} MiB ({r['peak_kind']})")
    report(results, args, ("arch", "batch", "size", "precision", "channels_last", "compile", "steps", "warmup"), "step")


if __name__ == "__main__":
    main()
