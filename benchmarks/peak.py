"""What the machine can do and what a step asks of it: a matmul probe of the practical peak per dtype,
and the FLOPs of one step (torch's FLOP counter), so that a benchmark can say which fraction of the
peak each side reaches.

    python benchmarks/peak.py            # this machine's fp32 and bf16 matmul peak
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

LARGEST = 2048  # the probe's largest square matmul: large enough for a CPU's or a GPU's practical peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, budget_s: float = 1.0) -> dict:
    """GFLOP/s of an n^3 matmul in ``dtype``, n doubled from 256 up to ``LARGEST`` while one product takes
    under a tenth of ``budget_s`` (an emulated bf16 runs at a few hundred MFLOP/s, where 2048^3 would
    take a minute), then repeated for ``budget_s``: the best a dense kernel reaches here."""
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        _sync(device)
        tic = time.perf_counter()
        a @ b
        _sync(device)
        once = time.perf_counter() - tic
        if n >= LARGEST or once > budget_s / 10:
            break
        n *= 2
    reps = max(1, int(budget_s / max(once, 1e-6)))
    _sync(device)
    tic = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - tic) / reps
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "gflops": 2 * n**3 / seconds / 1e9}


def machine_peaks(device: torch.device) -> dict[str, dict]:
    """The matmul peak in fp32 and in bf16, by precision name."""
    return {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}


def step_flops(step: Callable[[], object]) -> float:
    """FLOPs one call of ``step`` runs (matmuls and convolutions, forward and backward: what torch counts)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def build_parser() -> argparse.ArgumentParser:
    """No options; a parser all the same, so that a mistyped flag is refused and tests/test_docs.py can check
    the documentation's commands against it."""
    return argparse.ArgumentParser(description=__doc__.split("\n\n")[0])


def main() -> None:
    build_parser().parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, peak in machine_peaks(device).items():
        print(f"{name}: {peak['gflops']:.1f} GFLOP/s ({peak['n']}^3 matmul on {device.type})")


if __name__ == "__main__":
    main()
