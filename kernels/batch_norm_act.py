"""A ResNet block's BatchNorm2d in training, with the residual add and the ReLU after it, fused on the CPU.

``batch_norm_act(x, bn, residual, relu)`` is ``relu(bn(x) + residual)`` as torchvision's blocks compute it,
running statistics included. For channels_last CPU activations in training it runs one C++ operator
forward and one backward (``kernels/cpu/batch_norm_act.cpp``, built with torch's C++ extension loader the
first time a process needs it, then cached), where ATen makes five to seven passes over the activation;
everywhere else (CUDA: cuDNN; eval mode; contiguous layout; under torch.compile, which traces the plain
ops) it runs ``batch_norm_act_torch``, the same math in plain torch, exactly as torchvision's block does.

Why it is on by default, measured on the 2-core AMD EPYC (Zen 3, AVX2, fp32) of 2026-12-07: one ResNet-50
trunk pass's BatchNorms take 1.4-1.7x less time forward and 0.8-1.25x backward (``python
benchmarks/batch_norm_bench.py``, a noisy machine), and the share of the BYOL step's operator time outside
the convolutions falls from 15.6-16.6% to 13.5-14.6% (docs/benchmarks.md). ``LCR_KERNELS=torch`` (or
``kernels.backend=torch``) takes the plain path everywhere; the start-up self-check builds and checks the
operator and falls back to the plain path if either fails.
"""
from __future__ import annotations

import functools
import os
import platform

import torch
from torch import nn

from .dispatch import BACKEND

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu", "batch_norm_act.cpp")
EXTENSION = "lcr_fast_batch_norm_act"
# -fno-trapping-math lets the ReLU's select vectorise; -ffp-contract=off keeps the forward's pre-activation and
# the backward's recomputation of it rounding alike (the backward's ReLU mask is the forward's).
CFLAGS = ("-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp")
# Vector width by what this CPU runs, as ATen's own dispatch reports it: the x86-64 baseline (SSE2) left the
# statistics pass compute-bound. The build is per machine; the ISA in the extension's name keeps a shared cache
# from serving one CPU's build to another.
AVX2_FLAGS = ("-mavx2", "-mfma")  # for ATen's AVX2 and AVX512 levels (and any later AVX512 variant it names)
OP = "batch_norm_act"
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def load_operator() -> None:
    """Build (first time on this machine, ~20 s) and load the operator; raises what the build raises."""
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    flags = AVX2_FLAGS if platform.machine() in ("x86_64", "AMD64") and isa.startswith(("AVX2", "AVX512")) else ()
    cpp_extension.load(name=f"{EXTENSION}_{isa.lower().replace(' ', '_')}", sources=[SOURCE],
                       extra_cflags=[*CFLAGS, *flags], extra_ldflags=["-fopenmp"], is_python_module=False,
                       verbose=False)


@functools.cache
def operator_available() -> bool:
    """Whether the operator is loaded, building it if needed; a failed build is tried once per process."""
    try:
        load_operator()
    except Exception:  # a missing compiler or a failed build: the plain path stays
        return False
    return True


def batch_norm_per_view(bn: nn.Module, x: torch.Tensor, views: int = 1) -> torch.Tensor:
    """``bn`` on each of the ``views`` equal batches of ``x`` in turn, as one call per view would normalise them
    and move the running statistics; plain ``bn(x)`` for one view."""
    return bn(x) if views == 1 else torch.cat([bn(part) for part in x.chunk(views)])


def batch_norm_act_torch(x: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
                         relu: bool = True, views: int = 1) -> torch.Tensor:
    """The plain path: torchvision's ``bn(x)`` (one call per view of the batch), ``+= residual``, in-place ReLU."""
    out = batch_norm_per_view(bn, x, views)
    if residual is not None:
        out += residual
    return torch.relu_(out) if relu else out


def fused_path(x: torch.Tensor) -> bool:
    """Whether activations like ``x`` take the fused operator in training (a trunk asks before batching its
    views: the operator keeps each view's statistics in one pass, the plain path would split and concatenate)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dim() != 4 or x.dtype not in DTYPES:
        return False
    if BACKEND.mode == "torch" or OP in BACKEND.disabled():
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and operator_available()


def fused_applies(x: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None, views: int = 1) -> bool:
    """Whether ``batch_norm_act`` takes the fused operator for these arguments."""
    if not (bn.training and bn.track_running_stats and bn.affine) or bn.momentum is None:
        return False
    if bn.weight.dtype != torch.float32 or x.dim() != 4 or x.shape[0] % views or x.numel() <= views * x.shape[1]:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous(memory_format=torch.channels_last)):
        return False
    return fused_path(x)


def batch_norm_act_fused(x: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
                         relu: bool = True, views: int = 1) -> torch.Tensor:
    """The fused path, whatever ``fused_applies`` says (the operator checks its arguments): one C++ op, the
    forward, its backward recorded by the op itself, and the batches counted."""
    return torch.ops.lcr_fast_cpu.batch_norm_act(x, residual, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                 bn.num_batches_tracked, bn.momentum, bn.eps, relu, views)


def batch_norm_act(x: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None,
                   relu: bool = True, views: int = 1) -> torch.Tensor:
    """``relu(bn(x) + residual)`` (each part optional), fused where ``fused_applies``, else plain. With
    ``views`` > 1 the batch is that many equal runs of samples, each normalised by its own statistics."""
    if not fused_applies(x, bn, residual, views):
        return batch_norm_act_torch(x, bn, residual, relu, views)
    return batch_norm_act_fused(x, bn, residual, relu, views)
