"""Operator self time of training steps (torch.profiler), and the share of it outside the convolutions:
what step_profile.py prints in full and step_bench.py prints for each side it times."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

CONVOLUTION = ("conv", "mkldnn_convolution")  # operator names that are convolution forward or backward


@dataclass
class OpProfile:
    """Self time per operator over ``steps`` profiled steps."""

    events: list  # torch.profiler's key averages with self time, most first
    steps: int

    @property
    def total_s(self) -> float:
        """Operator self time per step, seconds."""
        return sum(e.self_cpu_time_total for e in self.events) / 1e6 / self.steps

    @property
    def convolution_share(self) -> float:
        """The fraction of the operator self time spent in convolutions, forward and backward: the part
        only faster arithmetic shortens; the rest is memory-bound passes and overhead."""
        conv = sum(e.self_cpu_time_total for e in self.events if any(k in e.key for k in CONVOLUTION))
        return conv / sum(e.self_cpu_time_total for e in self.events)

    def top(self, count: int) -> list[str]:
        """The ``count`` operators with the most self time, one line each."""
        total = sum(e.self_cpu_time_total for e in self.events)
        return [f"{100 * e.self_cpu_time_total / total:6.1f}%  {e.self_cpu_time_total / 1e6 / self.steps:7.3f} s/step  "
                f"{e.count // self.steps:5d} calls/step  {e.key}" for e in self.events[:count]]


def profile_steps(step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], x1: torch.Tensor,
                  x2: torch.Tensor, first: int, steps: int) -> OpProfile:
    """Profile ``steps`` calls of ``step`` (numbered from ``first``) on one pair of batches."""
    device = x1.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            loss = step(first + i, x1, x2)
        float(loss)
    events = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return OpProfile(events, steps)
