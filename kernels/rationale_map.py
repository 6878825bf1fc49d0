"""Rationale map A = normalise(max_k relu(y)) from the detector's conv+BN output y [B, K, h, w].

The reference normalises with the min and max of the WHOLE batch (``per_sample=False``);
``per_sample=True`` uses each sample's own h*w. Forward: one kernel takes the channel max, its
arg-max and each row's min/max; a second rescales with the batch (or row) range. Intermediate
values are rounded to the input dtype exactly where the eager composition rounds them, so the map
(and which elements tie at the min and max) is bit-identical to it. Backward follows torch
autograd of that composition: the channel max routes to the single returned index (through the
ReLU), while the full-tensor min and max spread their gradient evenly over all tied elements.
"""
import torch

from .dispatch import memory_format_of, next_pow2, tl, triton, use_triton

BLOCK_K = 32
BLOCK_S = 128
BLOCK_B = 256


@triton.jit
def _range(rmin_ptr, rmax_ptr, b, B, GLOBAL: tl.constexpr, BLOCK_B: tl.constexpr):
    """(min, max) of a over the batch (GLOBAL) or over row b, from the per-row extrema."""
    if GLOBAL:
        lo = tl.full([BLOCK_B], float("inf"), tl.float32)
        hi = tl.full([BLOCK_B], float("-inf"), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs = b0 + tl.arange(0, BLOCK_B)
            lo = tl.minimum(lo, tl.load(rmin_ptr + offs, mask=offs < B, other=float("inf")))
            hi = tl.maximum(hi, tl.load(rmax_ptr + offs, mask=offs < B, other=float("-inf")))
        mn = tl.min(lo, axis=0)
        mx = tl.max(hi, axis=0)
    else:
        mn = tl.load(rmin_ptr + b)
        mx = tl.load(rmax_ptr + b)
    return mn, mx


@triton.jit
def _rmap_reduce_kernel(y_ptr, a_ptr, idx_ptr, rmin_ptr, rmax_ptr, K, S, y_sb, y_sk, y_ss,
                        BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    lo = tl.full([BLOCK_S], float("inf"), tl.float32)
    hi = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        best = tl.full([BLOCK_S], -1.0, tl.float32)
        best_k = tl.zeros([BLOCK_S], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = (offs_k[:, None] < K) & mask_s[None, :]
            y = tl.load(y_ptr + b * y_sb + offs_k[:, None] * y_sk + offs_s[None, :] * y_ss, mask=mask, other=0.0)
            v = tl.where(mask, tl.maximum(y.to(tl.float32), 0.0), -1.0)
            cmax, ck = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
            # strict '>' keeps the first channel on ties across chunks, as within one
            take = cmax > best
            best = tl.where(take, cmax, best)
            best_k = tl.where(take, ck + k0, best_k)
        tl.store(a_ptr + b * S + offs_s, best, mask=mask_s)
        tl.store(idx_ptr + b * S + offs_s, best_k, mask=mask_s)
        lo = tl.minimum(lo, tl.where(mask_s, best, float("inf")))
        hi = tl.maximum(hi, tl.where(mask_s, best, float("-inf")))
    tl.store(rmin_ptr + b, tl.min(lo, axis=0))
    tl.store(rmax_ptr + b, tl.max(hi, axis=0))


@triton.jit
def _rmap_norm_kernel(a_ptr, rmin_ptr, rmax_ptr, out_ptr, B, S, eps,
                      GLOBAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    dt = out_ptr.dtype.element_ty
    mn, mx = _range(rmin_ptr, rmax_ptr, b, B, GLOBAL, BLOCK_B)
    # max(a - mn) == round(mx - mn) because rounding is monotonic
    den = (eps + (mx - mn).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    a = tl.load(a_ptr + b * S + offs_s, mask=mask_s, other=0.0)
    a2 = (a - mn).to(dt).to(tl.float32)
    tl.store(out_ptr + b * S + offs_s, tl.math.div_rn(a2, den).to(dt), mask=mask_s)


@triton.jit
def _rmap_bwd_partials_kernel(a_ptr, g_ptr, rmin_ptr, rmax_ptr, part_ptr, B, S, g_sb, g_ss, eps,
                              GLOBAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per row: sum(g * a2 / den^2), sum(g / den), #(a2 == max) and #(a == min)."""
    b = tl.program_id(0)
    DT = g_ptr.dtype.element_ty  # autograd hands dA in the map's dtype
    mn, mx = _range(rmin_ptr, rmax_ptr, b, B, GLOBAL, BLOCK_B)
    top = (mx - mn).to(DT).to(tl.float32)
    den = (eps + top).to(DT).to(tl.float32)
    s_ga = tl.zeros([BLOCK_S], dtype=tl.float32)
    s_g = tl.zeros([BLOCK_S], dtype=tl.float32)
    n_top = tl.zeros([BLOCK_S], dtype=tl.float32)
    n_bot = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        a = tl.load(a_ptr + b * S + offs_s, mask=mask_s, other=0.0)
        g = tl.load(g_ptr + b * g_sb + offs_s * g_ss, mask=mask_s, other=0.0).to(tl.float32)
        a2 = (a - mn).to(DT).to(tl.float32)
        s_ga += g * ((a2 / den) / den)
        s_g += g / den
        n_top += tl.where(mask_s & (a2 == top), 1.0, 0.0)
        n_bot += tl.where(mask_s & (a == mn), 1.0, 0.0)
    tl.store(part_ptr + b, tl.sum(s_ga, axis=0))
    tl.store(part_ptr + B + b, tl.sum(s_g, axis=0))
    tl.store(part_ptr + 2 * B + b, tl.sum(n_top, axis=0))
    tl.store(part_ptr + 3 * B + b, tl.sum(n_bot, axis=0))


@triton.jit
def _rmap_bwd_kernel(a_ptr, idx_ptr, g_ptr, rmin_ptr, rmax_ptr, part_ptr, dy_ptr, B, K, S,
                     g_sb, g_ss, d_sb, d_sk, d_ss, eps,
                     GLOBAL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_B: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    DT = dy_ptr.dtype.element_ty
    mn, mx = _range(rmin_ptr, rmax_ptr, b, B, GLOBAL, BLOCK_B)
    top = (mx - mn).to(DT).to(tl.float32)
    den = (eps + top).to(DT).to(tl.float32)
    if GLOBAL:
        s_ga = tl.zeros([BLOCK_B], dtype=tl.float32)
        s_g = tl.zeros([BLOCK_B], dtype=tl.float32)
        n_top = tl.zeros([BLOCK_B], dtype=tl.float32)
        n_bot = tl.zeros([BLOCK_B], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs = b0 + tl.arange(0, BLOCK_B)
            m = offs < B
            s_ga += tl.load(part_ptr + offs, mask=m, other=0.0)
            s_g += tl.load(part_ptr + B + offs, mask=m, other=0.0)
            n_top += tl.load(part_ptr + 2 * B + offs, mask=m, other=0.0)
            n_bot += tl.load(part_ptr + 3 * B + offs, mask=m, other=0.0)
        sum_ga, sum_g = tl.sum(s_ga, axis=0), tl.sum(s_g, axis=0)
        cnt_top, cnt_bot = tl.sum(n_top, axis=0), tl.sum(n_bot, axis=0)
    else:
        sum_ga, sum_g = tl.load(part_ptr + b), tl.load(part_ptr + B + b)
        cnt_top, cnt_bot = tl.load(part_ptr + 2 * B + b), tl.load(part_ptr + 3 * B + b)
    g_den = -sum_ga                    # d/d(eps + max(a2)) of a2 / (eps + max(a2))
    g_min = -(sum_g + g_den)           # d/d min(a) of a - min(a): minus the sum of d/d a2
    a = tl.load(a_ptr + b * S + offs_s, mask=mask_s, other=0.0)
    g = tl.load(g_ptr + b * g_sb + offs_s * g_ss, mask=mask_s, other=0.0).to(tl.float32)
    a2 = (a - mn).to(DT).to(tl.float32)
    da = g / den + tl.where(a2 == top, g_den / cnt_top, 0.0) + tl.where(a == mn, g_min / cnt_bot, 0.0)
    da = tl.where(a > 0, da, 0.0)      # ReLU: the chosen channel passes only if it was positive
    k_star = tl.load(idx_ptr + b * S + offs_s, mask=mask_s, other=-1)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k[:, None] < K) & mask_s[None, :]
        dy = tl.where(offs_k[:, None] == k_star[None, :], da[None, :], 0.0)
        tl.store(dy_ptr + b * d_sb + offs_k[:, None] * d_sk + offs_s[None, :] * d_ss, dy.to(DT), mask=mask)


def _blocks(K: int, S: int, B: int) -> dict:
    return dict(BLOCK_K=min(BLOCK_K, max(16, next_pow2(K))), BLOCK_S=min(BLOCK_S, max(16, next_pow2(S))),
                BLOCK_B=min(BLOCK_B, max(16, next_pow2(B))))


class RationaleMapFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, per_sample: bool, eps: float) -> torch.Tensor:
        B, K, h, w = y.shape
        S = h * w
        yf = y.flatten(2)
        blk = _blocks(K, S, B)
        a = torch.empty((B, S), device=y.device, dtype=torch.float32)
        idx = torch.empty((B, S), device=y.device, dtype=torch.int32)
        rmin = torch.empty(B, device=y.device, dtype=torch.float32)
        rmax = torch.empty_like(rmin)
        _rmap_reduce_kernel[(B,)](yf, a, idx, rmin, rmax, K, S, *yf.stride(),
                                  BLOCK_K=blk["BLOCK_K"], BLOCK_S=blk["BLOCK_S"])
        out = torch.empty((B, h, w), device=y.device, dtype=y.dtype)
        grid = (B, triton.cdiv(S, blk["BLOCK_S"]))
        _rmap_norm_kernel[grid](a, rmin, rmax, out, B, S, eps, GLOBAL=not per_sample,
                                BLOCK_S=blk["BLOCK_S"], BLOCK_B=blk["BLOCK_B"])
        ctx.save_for_backward(a, idx, rmin, rmax)
        ctx.meta = (y.shape, y.dtype, memory_format_of(y), per_sample, eps, blk)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        a, idx, rmin, rmax = ctx.saved_tensors
        shape, dtype, layout, per_sample, eps, blk = ctx.meta
        B, K, h, w = shape
        S = h * w
        g = dout.to(dtype).flatten(1)
        part = torch.empty((4, B), device=a.device, dtype=torch.float32)
        _rmap_bwd_partials_kernel[(B,)](a, g, rmin, rmax, part, B, S, *g.stride(), eps,
                                        GLOBAL=not per_sample,
                                        BLOCK_S=blk["BLOCK_S"], BLOCK_B=blk["BLOCK_B"])
        dy = torch.empty(shape, device=a.device, dtype=dtype, memory_format=layout)
        d = dy.flatten(2)
        grid = (B, triton.cdiv(S, blk["BLOCK_S"]))
        _rmap_bwd_kernel[grid](a, idx, g, rmin, rmax, part, d, B, K, S, *g.stride(), *d.stride(), eps,
                               GLOBAL=not per_sample, **blk)
        return dy, None, None


def rationale_map_torch(y: torch.Tensor, per_sample: bool = False, eps: float = 1e-7) -> torch.Tensor:
    a, _ = torch.max(torch.relu(y), dim=1)
    if per_sample:
        a = a - a.amin(dim=(1, 2), keepdim=True)
        return a / (eps + a.amax(dim=(1, 2), keepdim=True))
    a = a - torch.min(a)
    return a / (eps + torch.max(a))


def rationale_map(y: torch.Tensor, per_sample: bool = False, eps: float = 1e-7) -> torch.Tensor:
    """[B, K, h, w] -> [B, h, w] in [0, 1): channel max of relu(y), min-max scaled over the batch
    (the reference) or per sample."""
    if not use_triton(y, op="rationale_map"):
        return rationale_map_torch(y, per_sample, eps)
    return RationaleMapFunction.apply(y, per_sample, float(eps))
