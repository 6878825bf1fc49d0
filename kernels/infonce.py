"""MoCo InfoNCE against a queue of negatives, without the B x (K + 1) logits in memory.

logits = [q.k, q @ queue] / T, loss = mean over rows of cross-entropy with label 0. Eager torch
writes the logits (33 MB at B=128, K=65536), copies them for the cat, scales, soft-maxes and
reads them again backward. Here each program streams a slice of the queue through an online
softmax (flash-decoding style: the K axis is split over programs so a batch of 128 still fills
the GPU), a small kernel merges the slices' (max, sum) with the positive logit, and backward
recomputes the tile logits to accumulate dq = sum_j p_j queue_j per slice. fp32 operands use
3xTF32 tensor-core products, which keep fp32 accuracy: at K = 65536 the loss and dq are as close to
fp64 as with fp32 products (1e-7), where plain TF32 moves logits by up to 3e-3, the loss by 3e-4 and
dq by 3e-4 relative (benchmarks/infonce_precision.py).
"""
import torch

from .dispatch import interpreted, next_pow2, sm_count, tl, triton, use_triton

# The queue kernels' tiles, chosen with benchmarks/kernel_resources.py (ptxas at sm_80 and sm_90): on fp32
# inputs (3xTF32 keeps two halves of every operand) 16 rows x 32 keys per step, D in chunks of 64, 8 warps
# and 2 stages take 113 (forward) and 166 (backward) registers and 24 KB of shared memory, without spills.
# With 32 rows the backward spills on sm_90; with 64 keys it needs 238-255 registers, with 4 warps 254;
# with D in one piece the backward spilled in every tiling tried (84 B to 20 KB per thread).
BLOCK_B = 16
BLOCK_K = 32
BLOCK_DC = 64
NUM_WARPS = 8
NUM_STAGES = 2
PROGRAMS_PER_SM = 2
BLOCK_ROWS = 16           # rows per program in the small merge / finish kernels


@triton.jit
def _load_rows(ptr, offs_r, offs_c, R, C, s_r, s_c, UPCAST: tl.constexpr):
    x = tl.load(ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c,
                mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits_tile(q_ptr, queue_ptr, offs_b, offs_k, B, D, K, q_sb, q_sd, qu_sd, qu_sk, inv_t,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DC: tl.constexpr, BLOCK_K: tl.constexpr):
    """q[offs_b] @ queue[:, offs_k] / T, -inf past K, summed over chunks of D with q re-read (from L1) per
    chunk. A whole [BLOCK_B, D] q operand would sit in every warp's registers (BLOCK_B rows are one MMA
    tile along M): 128 per thread at D = 256, twice that once 3xTF32 splits it, so it spilled."""
    s = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, BLOCK_D, BLOCK_DC):
        offs_d = d0 + tl.arange(0, BLOCK_DC)
        q = _load_rows(q_ptr, offs_b, offs_d, B, D, q_sb, q_sd, UPCAST)
        kt = _load_rows(queue_ptr, offs_d, offs_k, D, K, qu_sd, qu_sk, UPCAST)
        s = tl.dot(q, kt, s, input_precision=PREC)
    return tl.where(offs_k[None, :] < K, s * inv_t, float("-inf"))


@triton.jit
def _infonce_fwd_kernel(q_ptr, queue_ptr, m_ptr, l_ptr, B, D, K, k_per_split, q_sb, q_sd, qu_sd, qu_sk, inv_t,
                        UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DC: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b, split = tl.program_id(0), tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        s = _logits_tile(q_ptr, queue_ptr, offs_b, k0 + tl.arange(0, BLOCK_K), B, D, K, q_sb, q_sd, qu_sd, qu_sk,
                         inv_t, UPCAST, PREC, BLOCK_B, BLOCK_D, BLOCK_DC, BLOCK_K)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + split * B + offs_b, m, mask=offs_b < B)
    tl.store(l_ptr + split * B + offs_b, l, mask=offs_b < B)


@triton.jit
def _infonce_merge_kernel(q_ptr, k_ptr, m_ptr, l_ptr, loss_ptr, lse_ptr, pos_ptr, B, D, n_split,
                          q_sb, q_sd, k_sb, k_sd, inv_t, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merges the slices' (max, sum) with the positive logit: per-row loss, lse and l_pos."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, offs_b, offs_d, B, D, q_sb, q_sd, True)
    k = _load_rows(k_ptr, offs_b, offs_d, B, D, k_sb, k_sd, True)
    pos = tl.sum(q * k, axis=1) * inv_t
    m = pos
    l = tl.full([BLOCK_B], 1.0, tl.float32)
    for split in range(0, n_split):
        m_s = tl.load(m_ptr + split * B + offs_b, mask=offs_b < B, other=0.0)
        l_s = tl.load(l_ptr + split * B + offs_b, mask=offs_b < B, other=0.0)
        m_new = tl.maximum(m, m_s)
        l = l * tl.exp(m - m_new) + l_s * tl.exp(m_s - m_new)
        m = m_new
    lse = m + tl.log(l)
    tl.store(loss_ptr + offs_b, lse - pos, mask=offs_b < B)
    tl.store(lse_ptr + offs_b, lse, mask=offs_b < B)
    tl.store(pos_ptr + offs_b, pos, mask=offs_b < B)


@triton.jit
def _infonce_bwd_kernel(q_ptr, queue_ptr, lse_ptr, dq_part_ptr, B, D, K, k_per_split, q_sb, q_sd, qu_sd, qu_sk,
                        inv_t, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per slice of the queue: sum_j softmax_j * queue[:, j] for each row (unscaled)."""
    pid_b, split = tl.program_id(0), tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + offs_b, mask=offs_b < B, other=0.0)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        s = _logits_tile(q_ptr, queue_ptr, offs_b, offs_k, B, D, K, q_sb, q_sd, qu_sd, qu_sk, inv_t,
                         UPCAST, PREC, BLOCK_B, BLOCK_D, BLOCK_DC, BLOCK_K)
        p = tl.exp(s - lse[:, None])
        kt = _load_rows(queue_ptr, offs_d, offs_k, D, K, qu_sd, qu_sk, UPCAST)  # again: L1 / L2 holds it
        acc += tl.dot(p.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    tl.store(dq_part_ptr + split * B * D + offs_b[:, None] * D + offs_d[None, :], acc,
             mask=(offs_b[:, None] < B) & (offs_d[None, :] < D))


@triton.jit
def _infonce_bwd_finish_kernel(q_ptr, k_ptr, dq_part_ptr, lse_ptr, pos_ptr, dloss_ptr, dq_ptr, dk_ptr,
                               B, D, n_split, q_sb, q_sd, k_sb, k_sd, scale,
                               WITH_DQ: tl.constexpr, WITH_DK: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq = g/(B T) [(p_pos - 1) k + sum_j p_j queue_j], dk = g/(B T) (p_pos - 1) q."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_b[:, None] < B) & (offs_d[None, :] < D)
    coef = tl.load(dloss_ptr) * scale
    lse = tl.load(lse_ptr + offs_b, mask=offs_b < B, other=0.0)
    pos = tl.load(pos_ptr + offs_b, mask=offs_b < B, other=0.0)
    w_pos = (tl.exp(pos - lse) - 1.0)[:, None] * coef
    if WITH_DQ:
        neg = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for split in range(0, n_split):
            neg += tl.load(dq_part_ptr + split * B * D + offs_b[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        k = _load_rows(k_ptr, offs_b, offs_d, B, D, k_sb, k_sd, True)
        tl.store(dq_ptr + offs_b[:, None] * D + offs_d[None, :],
                 (w_pos * k + coef * neg).to(dq_ptr.dtype.element_ty), mask=mask)
    if WITH_DK:
        q = _load_rows(q_ptr, offs_b, offs_d, B, D, q_sb, q_sd, True)
        tl.store(dk_ptr + offs_b[:, None] * D + offs_d[None, :], (w_pos * q).to(dk_ptr.dtype.element_ty), mask=mask)


def _plan(q: torch.Tensor, queue: torch.Tensor) -> dict:
    B, D = q.shape
    K = queue.shape[1]
    # Triton's CPU interpreter multiplies bf16/fp16 tiles as raw integers, so it gets fp32 operands
    upcast = q.dtype != queue.dtype or interpreted(q)
    BLOCK_D = max(16, next_pow2(D))
    n_b = triton.cdiv(B, BLOCK_B)
    tiles = triton.cdiv(K, BLOCK_K)
    k_per_split = triton.cdiv(tiles, max(1, PROGRAMS_PER_SM * sm_count(q) // n_b)) * BLOCK_K
    fp32 = upcast or q.dtype == torch.float32
    return dict(n_b=n_b, n_split=triton.cdiv(K, k_per_split), k_per_split=k_per_split, UPCAST=upcast,
                PREC="tf32x3" if fp32 else "tf32", BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, BLOCK_DC=min(BLOCK_DC, BLOCK_D),
                BLOCK_K=BLOCK_K)


def _tiling(plan: dict) -> dict:
    """The queue kernels' compile-time arguments and launch options."""
    keys = ("UPCAST", "PREC", "BLOCK_B", "BLOCK_D", "BLOCK_DC", "BLOCK_K")
    return {**{k: plan[k] for k in keys}, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


class InfoNCEQueueFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
        B, D = q.shape
        K = queue.shape[1]
        plan = _plan(q, queue)
        n_split = plan["n_split"]
        m = torch.empty((n_split, B), device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        _infonce_fwd_kernel[(plan["n_b"], n_split)](
            q, queue, m, l, B, D, K, plan["k_per_split"], *q.stride(), *queue.stride(), 1.0 / temperature,
            **_tiling(plan))
        loss_rows = torch.empty(B, device=q.device, dtype=torch.float32)
        lse = torch.empty_like(loss_rows)
        pos = torch.empty_like(loss_rows)
        _infonce_merge_kernel[(triton.cdiv(B, BLOCK_ROWS),)](
            q, k, m, l, loss_rows, lse, pos, B, D, n_split, *q.stride(), *k.stride(), 1.0 / temperature,
            BLOCK_B=BLOCK_ROWS, BLOCK_D=plan["BLOCK_D"])
        ctx.save_for_backward(q, k, queue, lse, pos)
        ctx.plan, ctx.inv_t = plan, 1.0 / temperature
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        q, k, queue, lse, pos = ctx.saved_tensors
        plan = ctx.plan
        B, D = q.shape
        K = queue.shape[1]
        with_dq, with_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq_part = torch.empty((plan["n_split"], B, D), device=q.device, dtype=torch.float32)
        if with_dq:
            _infonce_bwd_kernel[(plan["n_b"], plan["n_split"])](
                q, queue, lse, dq_part, B, D, K, plan["k_per_split"], *q.stride(), *queue.stride(), ctx.inv_t,
                **_tiling(plan))
        dq = torch.empty((B, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((B, D), device=k.device, dtype=k.dtype)
        _infonce_bwd_finish_kernel[(triton.cdiv(B, BLOCK_ROWS),)](
            q, k, dq_part, lse, pos, dloss.float().contiguous(), dq, dk, B, D, plan["n_split"],
            *q.stride(), *k.stride(), ctx.inv_t / B, WITH_DQ=with_dq, WITH_DK=with_dk,
            BLOCK_B=BLOCK_ROWS, BLOCK_D=plan["BLOCK_D"])
        return (dq if with_dq else None), (dk if with_dk else None), None, None


def infonce_queue_torch(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.detach()
    logits = (torch.cat([l_pos, l_neg], dim=1) / temperature).float()
    # Cross-entropy with label 0 as log_softmax and a column: F.cross_entropy's NLLLoss raises on CUDA
    # under torch.use_deterministic_algorithms (engine.deterministic). Both hand log_softmax's backward
    # the same gradient, so gradients are equal to the bit (the loss to its last bit: another mean order).
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


def infonce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy (label 0) of [q.k, q @ queue] / T, mean over rows; q, k [B, D], queue [D, K]."""
    if not use_triton(q, op="infonce_queue"):
        return infonce_queue_torch(q, k, queue, temperature)
    return InfoNCEQueueFunction.apply(q, k, queue.detach(), float(temperature))
