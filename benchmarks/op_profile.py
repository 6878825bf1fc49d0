"""Operator self time of training steps (torch.profiler), and the share of it outside the convolutions:
what step_profile.py prints in full and step_bench.py prints for each side it times."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# Operator names that are convolution forward or backward: ATen's, and lcr-fast's weight gradient
# (kernels/conv2d.py: lcr_fast::conv2d_weight_grad). Autograd's nodes (ConvolutionBackward0, ...) are not: the
# gradient sums autograd runs under them are not convolution work.
CONVOLUTION = ("conv", "mkldnn_convolution")
NESTED = " (inside a convolution)"


@dataclass
class OpRow:
    """One operator's self time over the profiled steps; ``nested`` when it ran inside a convolution operator."""

    name: str
    self_us: float
    count: int
    nested: bool

    @property
    def key(self) -> str:
        return self.name + (NESTED if self.nested else "")


@dataclass
class OpProfile:
    """Self time per operator over ``steps`` profiled steps, most first."""

    rows: list[OpRow]
    steps: int

    @property
    def total_s(self) -> float:
        """Operator self time per step, seconds."""
        return sum(r.self_us for r in self.rows) / 1e6 / self.steps

    @property
    def convolution_share(self) -> float:
        """The fraction of the operator self time spent in convolutions, forward and backward, with what they call
        (oneDNN's reorders and copies, the weight gradient's matrix products): the part only faster arithmetic
        shortens; the rest is memory-bound passes and overhead."""
        conv = sum(r.self_us for r in self.rows if r.nested or is_convolution(r.name))
        return conv / sum(r.self_us for r in self.rows)

    def top(self, count: int) -> list[str]:
        """The ``count`` operators with the most self time, one line each."""
        total = sum(r.self_us for r in self.rows)
        return [f"{100 * r.self_us / total:6.1f}%  {r.self_us / 1e6 / self.steps:7.3f} s/step  "
                f"{r.count // self.steps:5d} calls/step  {r.key}" for r in self.rows[:count]]


def is_convolution(name: str) -> bool:
    return any(k in name for k in CONVOLUTION)


def _inside_convolution(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if is_convolution(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], x1: torch.Tensor,
                  x2: torch.Tensor, first: int, steps: int) -> OpProfile:
    """Profile ``steps`` calls of ``step`` (numbered from ``first``) on one pair of batches."""
    device = x1.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            loss = step(first + i, x1, x2)
        float(loss)
    totals: dict[tuple[str, bool], list] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.self_cpu_time_total > 0:
            total = totals[event.name, not is_convolution(event.name) and _inside_convolution(event)]
            total[0] += event.self_cpu_time_total
            total[1] += 1
    rows = [OpRow(name, us, count, nested) for (name, nested), (us, count) in totals.items()]
    return OpProfile(sorted(rows, key=lambda r: -r.self_us), steps)
