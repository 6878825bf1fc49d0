"""A ResNet trunk's stride-1 convolution with its weight gradient computed as matrix products on the CPU.

``conv2d(conv, x)`` is ``conv(x)``. For a channels_last fp32 CPU input in training, with a 1x1 or a padded 3x3
stride-1 kernel (every convolution of a ResNet block but the stride-2 ones), it runs ATen's convolution
forward and its input gradient as they are, and computes the weight gradient itself: for a 1x1 kernel one
matrix product over the rows of the channels_last tensors (``grad_out^T @ x``), for a 3x3 kernel nine, each
over the rows of zero-padded copies shifted by the tap's offset (``weight_grad_gemm``). Everywhere else
(CUDA, bf16 autocast, no_grad, other kernels, torch.compile, ``LCR_KERNELS=torch``, or the op switched off on
``BACKEND``) it is ``conv(x)``.

Why, measured on the 2-core AMD EPYC (Zen 3, AVX2, fp32) of 2026-12-07 with ``python benchmarks/conv_bench.py``
(ResNet-50 without max-pool, batch 8, 112 px; twice): oneDNN computes these weight gradients at 65-136 GFLOP/s
(65-104 for the 3x3 ones), where a 2048^3 sgemm reaches 139-144 (``benchmarks/peak.py``); the matrix products
run at 81-164. One trunk pass's weight gradients take 0.48-0.50 s against 0.56-0.58 s (1.17x), its forward and
backward 1.05-1.08x less time. Per shape, the 1x1 ones at 56x56 are even (0.87-1.05x), every other one gains
(1.02-1.59x). bf16 keeps oneDNN: this CPU has no native bf16, so the choice there is unmeasured.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from .dispatch import BACKEND

OP = "conv2d_weight_grad"
KERNEL_SIZES = (1, 3)
# The weight gradient's operator: benchmarks/op_profile.py counts what runs inside it as convolution time, as it
# counts what ATen's convolutions call.
OP_NAME = "lcr_fast::conv2d_weight_grad"


def _aten_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
                   input_grad: bool) -> torch.Tensor:
    """ATen's input gradient (``input_grad``) or weight gradient of a stride-1 convolution without bias."""
    mask = [input_grad, not input_grad, False]
    grads = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], [padding, padding], [1, 1], False,
                                                [0, 0], 1, mask)
    return grads[0] if input_grad else grads[1]


def weight_grad_torch(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      padding: int) -> torch.Tensor:
    """ATen's weight gradient of a stride-1 convolution (oneDNN on the CPU): the reference of the same math."""
    return _aten_backward(grad_out, x, weight, padding, input_grad=False)


@torch.library.custom_op(OP_NAME, mutates_args=())
def weight_grad_gemm(grad_out: torch.Tensor, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """The weight gradient of a stride-1 ``kernel`` x ``kernel`` convolution with padding ``kernel // 2``, as
    matrix products over the rows of channels_last tensors; returned in channels_last layout, as the weight.

    One operator to torch: the profiler shows it by name, and torch's FLOP counter counts the convolution's
    FLOPs (``_weight_grad_flops``) rather than the padded products'."""
    n, c, h, w = x.shape
    c_out = grad_out.shape[1]
    rows_x = x.permute(0, 2, 3, 1)  # views: channels_last is [N, H, W, C] in memory
    rows_g = grad_out.permute(0, 2, 3, 1)
    if kernel == 1:
        return (rows_g.reshape(-1, c_out).t() @ rows_x.reshape(-1, c)).view(c_out, c, 1, 1)
    pad = kernel // 2
    hp, wp = h + 2 * pad, w + 2 * pad
    # On the padded grid, output pixel p meets input pixel p + kh * wp + kw for tap (kh, kw), within its image
    # whenever p is a real output pixel; grad_out is zero elsewhere on the grid, so each tap is one product
    # over all the batch's rows, without unfolding the input.
    # Only the borders are zeroed (F.pad would fill the whole buffer, then copy the interior over it).
    padded_x = x.new_empty(n, hp, wp, c)
    padded_x[:, :pad] = 0
    padded_x[:, h + pad:] = 0
    padded_x[:, pad:h + pad, :pad] = 0
    padded_x[:, pad:h + pad, w + pad:] = 0
    padded_x[:, pad:h + pad, pad:w + pad] = rows_x
    padded_g = grad_out.new_empty(n, hp, wp, c_out)
    padded_g[:, h:] = 0
    padded_g[:, :h, w:] = 0
    padded_g[:, :h, :w] = rows_g
    total = n * hp * wp
    flat_x = padded_x.view(total, c)
    flat_g = padded_g.view(total, c_out)
    out = x.new_empty(c_out, kernel, kernel, c)  # channels_last order of a [c_out, c, kernel, kernel] weight
    for kh in range(kernel):
        for kw in range(kernel):
            offset = kh * wp + kw
            torch.mm(flat_g[:total - offset].t(), flat_x[offset:], out=out[:, kh, kw])
    return out.permute(0, 3, 1, 2)


@weight_grad_gemm.register_fake
def _(grad_out: torch.Tensor, x: torch.Tensor, kernel: int) -> torch.Tensor:
    return x.new_empty(grad_out.shape[1], x.shape[1], kernel, kernel, memory_format=torch.channels_last)


@register_flop_formula(torch.ops.lcr_fast.conv2d_weight_grad)
def _weight_grad_flops(grad_out_shape, x_shape, kernel: int, out_shape=None) -> int:
    n, c, h, w = x_shape
    return 2 * n * h * w * c * grad_out_shape[1] * kernel * kernel


class _Conv2dGemmWeightGrad(torch.autograd.Function):
    """ATen's convolution forward and input gradient; ``weight_grad_gemm`` for the weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, None, 1, padding)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _aten_backward(grad_out, x, weight, ctx.padding, input_grad=True)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_gemm(grad_out, x, weight.shape[-1])
        return grad_x, grad_w, None


def gemm_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv2d`` computes this convolution's weight gradient itself."""
    if torch.compiler.is_compiling() or BACKEND.mode == "torch" or OP in BACKEND.disabled():
        return False
    if not torch.is_grad_enabled():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if not conv.weight.requires_grad or conv.weight.dtype != torch.float32 or conv.bias is not None:
        return False
    k = conv.kernel_size[0]
    if k not in KERNEL_SIZES or conv.kernel_size != (k, k) or conv.padding != (k // 2, k // 2):
        return False
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, with the weight gradient as matrix products where ``gemm_applies``."""
    if not gemm_applies(conv, x):
        return conv(x)
    return _Conv2dGemmWeightGrad.apply(x, conv.weight, conv.kernel_size[0] // 2)
