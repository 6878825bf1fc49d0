"""GradCAM map: cam = relu(sum_c feat * grad), one pass over the layer-4 activations.

Eager torch writes the [B, C, h, w] product to memory, reads it back to reduce, then applies the
ReLU; here each program reduces a [channels, pixels] tile stream in registers. ``grad`` is the
constant dL/dfeat (taken without create_graph), so only ``feat`` receives a gradient.
"""
import torch

from .dispatch import memory_format_of, tl, triton, use_triton

BLOCK_C = 32
BLOCK_S = 64


@triton.jit
def _gradcam_fwd_kernel(feat_ptr, grad_ptr, cam_ptr, C, S,
                        f_sb, f_sc, f_ss, g_sb, g_sc, g_ss,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_s[None, :]
        f = tl.load(feat_ptr + b * f_sb + offs_c[:, None] * f_sc + offs_s[None, :] * f_ss, mask=mask, other=0.0)
        g = tl.load(grad_ptr + b * g_sb + offs_c[:, None] * g_sc + offs_s[None, :] * g_ss, mask=mask, other=0.0)
        acc += tl.sum(f.to(tl.float32) * g.to(tl.float32), axis=0)
    cam = tl.maximum(acc, 0.0)
    tl.store(cam_ptr + b * S + offs_s, cam.to(cam_ptr.dtype.element_ty), mask=mask_s)


@triton.jit
def _gradcam_bwd_kernel(grad_ptr, cam_ptr, dcam_ptr, dfeat_ptr, C, S,
                        g_sb, g_sc, g_ss, d_sb, d_ss, o_sb, o_sc, o_ss,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_s = offs_s < S
    mask = (offs_c[:, None] < C) & mask_s[None, :]
    cam = tl.load(cam_ptr + b * S + offs_s, mask=mask_s, other=0.0)
    dcam = tl.load(dcam_ptr + b * d_sb + offs_s * d_ss, mask=mask_s, other=0.0).to(tl.float32)
    # torch's relu backward passes the gradient where its *output* is positive.
    dsum = tl.where(cam > 0, dcam, 0.0)
    g = tl.load(grad_ptr + b * g_sb + offs_c[:, None] * g_sc + offs_s[None, :] * g_ss, mask=mask, other=0.0)
    dfeat = g.to(tl.float32) * dsum[None, :]
    tl.store(dfeat_ptr + b * o_sb + offs_c[:, None] * o_sc + offs_s[None, :] * o_ss,
             dfeat.to(dfeat_ptr.dtype.element_ty), mask=mask)


def _gradcam_fwd(feat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    B, C, h, w = feat.shape
    f, g = feat.flatten(2), grad.flatten(2)  # views for contiguous and channels_last layouts
    S = h * w
    cam = torch.empty((B, h, w), device=feat.device, dtype=feat.dtype)
    grid = (B, triton.cdiv(S, BLOCK_S))
    _gradcam_fwd_kernel[grid](f, g, cam, C, S, *f.stride(), *g.stride(), BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return cam


def _gradcam_bwd(grad: torch.Tensor, cam: torch.Tensor, dcam: torch.Tensor, dtype: torch.dtype,
                 memory_format: torch.memory_format) -> torch.Tensor:
    B, C, h, w = grad.shape
    S = h * w
    dfeat = torch.empty(grad.shape, device=grad.device, dtype=dtype, memory_format=memory_format)
    g, d, o = grad.flatten(2), dcam.flatten(1), dfeat.flatten(2)
    grid = (B, triton.cdiv(S, BLOCK_S), triton.cdiv(C, BLOCK_C))
    _gradcam_bwd_kernel[grid](g, cam, d, o, C, S, *g.stride(), *d.stride(), *o.stride(),
                              BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return dfeat


class GradCAMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        cam = _gradcam_fwd(feat, grad)
        ctx.save_for_backward(grad, cam)
        ctx.dtype = feat.dtype
        ctx.memory_format = memory_format_of(feat)
        return cam

    @staticmethod
    def backward(ctx, dcam: torch.Tensor):
        grad, cam = ctx.saved_tensors
        dfeat = None
        if ctx.needs_input_grad[0]:
            dfeat = _gradcam_bwd(grad, cam, dcam, ctx.dtype, ctx.memory_format)
        return dfeat, None


def gradcam_torch(feat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.relu((feat * grad.detach()).sum(dim=1))


def gradcam(feat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """relu(sum over channels of feat * grad): [B, C, h, w] x2 -> [B, h, w]; differentiable in feat."""
    if not use_triton(feat, op="gradcam"):
        return gradcam_torch(feat, grad)
    return GradCAMFunction.apply(feat, grad.detach())
