"""Rationale features: normalize(mean over h*w of feat * att) -> [B, C] (eps 1e-12).

Eager torch materialises the [B, C, h, w] product. Here the weighted mean is reduced tile by tile in
registers, then each row is normalised. Forward only: nothing trains through these features.
"""
import torch
import torch.nn.functional as F

from .dispatch import next_pow2, tl, triton, use_triton

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


def _rationale_pool_triton(feat: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    B, C, h, w = feat.shape
    S = h * w
    f, a = feat.flatten(2), att.flatten(1)
    v = torch.empty((B, C), device=feat.device, dtype=torch.float32)
    _pool_kernel[(B, triton.cdiv(C, BLOCK_C))](f, a, v, C, S, 1.0 / S, *f.stride(), *a.stride(),
                                               BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    out = torch.empty((B, C), device=feat.device, dtype=feat.dtype)
    _normalize_kernel[(B,)](v, out, C, NORM_EPS, BLOCK=min(BLOCK_ROW, max(16, next_pow2(C))))
    return out


def rationale_pool_torch(feat: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    return F.normalize((feat * att[:, None]).mean((2, 3)), dim=1)


def rationale_pool(feat: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w], [B, h, w] -> [B, C]: L2-normalised mean of feat weighted by att.

    Only evaluation computes these features (``model.extract``, under no_grad), so the kernel has no
    backward: a call that autograd must differentiate takes the torch path."""
    needs_grad = torch.is_grad_enabled() and (feat.requires_grad or att.requires_grad)
    if needs_grad or not use_triton(feat, op="rationale_pool"):
        return rationale_pool_torch(feat, att)
    return _rationale_pool_triton(feat, att)
