"""Kernels that Triton's interpreter runs but its compiler refuses: mistakes only a compile can catch.

``tl.arange(0, 3)`` would not do: the interpreter shares the compiler's front-end checks and refuses
it too. These two fail later, in code generation: an early exit from a loop (``break``) and a device
helper without ``@triton.jit``, which the interpreter simply calls as Python. A ``@triton.jit``
function must live in a file for either to read its source.
"""
import torch
import triton
import triton.language as tl

BLOCK = 16


def _plus_one(x):  # should be @triton.jit
    return x + 1


@triton.jit
def _sum_first_kernel(x_ptr, out_ptr, n, stop, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, 4):
        if i == stop:
            break
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, acc, mask=offs < n)


@triton.jit
def _add_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _plus_one(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def sum_first(x: torch.Tensor, stop: int) -> torch.Tensor:
    """x added min(stop, 4) times, for at most BLOCK elements of fp32."""
    out = torch.empty_like(x)
    _sum_first_kernel[(1,)](x, out, x.numel(), stop, BLOCK=BLOCK)
    return out


def add_one(x: torch.Tensor) -> torch.Tensor:
    """x + 1, for at most BLOCK elements."""
    out = torch.empty_like(x)
    _add_one_kernel[(1,)](x, out, x.numel(), BLOCK=BLOCK)
    return out
