"""Rationale features: normalize(mean over h*w of feat * att) -> [B, C] (eps 1e-12).

Eager torch materialises the [B, C, h, w] product (forward and again in backward). Here the
weighted mean is reduced tile by tile in registers; backward writes dfeat and reduces datt in the
same sweep over feat.
"""
import torch
import torch.nn.functional as F

from .dispatch import memory_format_of, next_pow2, tl, triton, use_triton

NORM_EPS = 1e-12
BLOCK_C = 32
BLOCK_S = 64
BLOCK_ROW = 1024


@triton.jit
def _pool_kernel(feat_ptr, att_ptr, v_ptr, C, S, inv_s, f_sb, f_sc, f_ss, a_sb, a_ss,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_c[:, None] < C) & (offs_s[None, :] < S)
        f = tl.load(feat_ptr + b * f_sb + offs_c[:, None] * f_sc + offs_s[None, :] * f_ss, mask=mask, other=0.0)
        a = tl.load(att_ptr + b * a_sb + offs_s * a_ss, mask=offs_s < S, other=0.0)
        acc += tl.sum(f.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
    tl.store(v_ptr + b * C + offs_c, acc * inv_s, mask=offs_c < C)


@triton.jit
def _row_norm(v_ptr, b, C, BLOCK: tl.constexpr):
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + b * C + offs, mask=offs < C, other=0.0)
        sq += v * v
    return tl.sqrt(tl.sum(sq, axis=0))


@triton.jit
def _normalize_kernel(v_ptr, out_ptr, C, eps, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    denom = tl.maximum(_row_norm(v_ptr, b, C, BLOCK), eps)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + b * C + offs, mask=offs < C, other=0.0)
        tl.store(out_ptr + b * C + offs, (v / denom).to(out_ptr.dtype.element_ty), mask=offs < C)


@triton.jit
def _normalize_bwd_kernel(v_ptr, g_ptr, dv_ptr, C, g_sb, g_sc, eps, inv_s, BLOCK: tl.constexpr):
    """dv = g / c - v * <g, v> / (c^2 n) with c = max(n, eps); the clamp blocks the second term
    below eps, as torch's clamp_min backward does. Stored pre-divided by h*w (the mean)."""
    b = tl.program_id(0)
    n = _row_norm(v_ptr, b, C, BLOCK)
    c = tl.maximum(n, eps)
    gv = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + b * C + offs, mask=offs < C, other=0.0)
        g = tl.load(g_ptr + b * g_sb + offs * g_sc, mask=offs < C, other=0.0).to(tl.float32)
        gv += g * v
    through_norm = tl.where(n >= eps, tl.sum(gv, axis=0) / (c * c * tl.maximum(n, eps)), 0.0)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + b * C + offs, mask=offs < C, other=0.0)
        g = tl.load(g_ptr + b * g_sb + offs * g_sc, mask=offs < C, other=0.0).to(tl.float32)
        tl.store(dv_ptr + b * C + offs, (g / c - v * through_norm) * inv_s, mask=offs < C)


@triton.jit
def _pool_bwd_kernel(feat_ptr, att_ptr, dv_ptr, dfeat_ptr, datt_ptr, C, S,
                     f_sb, f_sc, f_ss, a_sb, a_ss, o_sb, o_sc, o_ss,
                     WITH_DFEAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    a = tl.load(att_ptr + b * a_sb + offs_s * a_ss, mask=mask_s, other=0.0).to(tl.float32)
    datt = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_s[None, :]
        dv = tl.load(dv_ptr + b * C + offs_c, mask=offs_c < C, other=0.0)
        f = tl.load(feat_ptr + b * f_sb + offs_c[:, None] * f_sc + offs_s[None, :] * f_ss, mask=mask, other=0.0)
        datt += tl.sum(dv[:, None] * f.to(tl.float32), axis=0)
        if WITH_DFEAT:
            tl.store(dfeat_ptr + b * o_sb + offs_c[:, None] * o_sc + offs_s[None, :] * o_ss,
                     (dv[:, None] * a[None, :]).to(dfeat_ptr.dtype.element_ty), mask=mask)
    tl.store(datt_ptr + b * S + offs_s, datt.to(datt_ptr.dtype.element_ty), mask=mask_s)


class RationalePoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        B, C, h, w = feat.shape
        S = h * w
        f, a = feat.flatten(2), att.flatten(1)
        v = torch.empty((B, C), device=feat.device, dtype=torch.float32)
        _pool_kernel[(B, triton.cdiv(C, BLOCK_C))](f, a, v, C, S, 1.0 / S, *f.stride(), *a.stride(),
                                                   BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
        out = torch.empty((B, C), device=feat.device, dtype=feat.dtype)
        block = min(BLOCK_ROW, max(16, next_pow2(C)))
        _normalize_kernel[(B,)](v, out, C, NORM_EPS, BLOCK=block)
        ctx.save_for_backward(feat, att, v)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        feat, att, v = ctx.saved_tensors
        B, C, h, w = feat.shape
        S = h * w
        dv = torch.empty_like(v)
        _normalize_bwd_kernel[(B,)](v, dout, dv, C, *dout.stride(), NORM_EPS, 1.0 / S,
                                    BLOCK=min(BLOCK_ROW, max(16, next_pow2(C))))
        with_dfeat = ctx.needs_input_grad[0]
        dfeat = torch.empty(feat.shape, device=feat.device, dtype=feat.dtype,
                            memory_format=memory_format_of(feat)) if with_dfeat else feat
        datt = torch.empty(att.shape, device=att.device, dtype=att.dtype)
        f, a, o = feat.flatten(2), att.flatten(1), dfeat.flatten(2)
        _pool_bwd_kernel[(B, triton.cdiv(S, BLOCK_S))](f, a, dv, o, datt, C, S, *f.stride(), *a.stride(),
                                                       *o.stride(), WITH_DFEAT=with_dfeat,
                                                       BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
        return (dfeat if with_dfeat else None), (datt if ctx.needs_input_grad[1] else None)


def rationale_pool_torch(feat: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    return F.normalize((feat * att[:, None]).mean((2, 3)), dim=1)


def rationale_pool(feat: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w], [B, h, w] -> [B, C]: L2-normalised mean of feat weighted by att."""
    if not use_triton(feat):
        return rationale_pool_torch(feat, att)
    return RationalePoolFunction.apply(feat, att)
