"""MoCo InfoNCE against a queue of negatives, without the B x (K + 1) logits in memory.

logits = [q.k, q @ queue] / T, loss = mean over rows of cross-entropy with label 0. Eager torch
writes the logits (33 MB at B=128, K=65536), copies them for the cat, scales, soft-maxes and
reads them again backward. Here each program streams a slice of the queue through an online
softmax (flash-decoding style: the K axis is split over programs so a batch of 128 still fills
the GPU), a small kernel merges the slices' (max, sum) with the positive logit, and backward
recomputes the tile logits to accumulate dq = sum_j p_j queue_j per slice. fp32 operands use
3xTF32 tensor-core products, which keep fp32 accuracy (plain TF32 would move logits by ~1e-3).
"""
import torch
import torch.nn.functional as F

from .dispatch import INTERPRETED, next_pow2, tl, triton, use_triton

TILE_BYTES = 32768        # per operand tile: bounds shared memory at D = 256 on every GPU we target
PROGRAMS_PER_SM = 2
BLOCK_ROWS = 16           # rows per program in the small merge / finish kernels


@triton.jit
def _logits_tile(q, queue_ptr, offs_d, offs_k, D, K, qu_sd, qu_sk, inv_t,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    mask = (offs_d[:, None] < D) & (offs_k[None, :] < K)
    kt = tl.load(queue_ptr + offs_d[:, None] * qu_sd + offs_k[None, :] * qu_sk, mask=mask, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PREC) * inv_t
    return tl.where(offs_k[None, :] < K, s, float("-inf")), kt


@triton.jit
def _load_rows(ptr, offs_b, offs_d, B, D, s_b, s_d, UPCAST: tl.constexpr):
    x = tl.load(ptr + offs_b[:, None] * s_b + offs_d[None, :] * s_d,
                mask=(offs_b[:, None] < B) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _infonce_fwd_kernel(q_ptr, queue_ptr, m_ptr, l_ptr, B, D, K, k_per_split, q_sb, q_sd, qu_sd, qu_sk, inv_t,
                        UPCAST: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b, split = tl.program_id(0), tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, offs_b, offs_d, B, D, q_sb, q_sd, UPCAST)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        s, _ = _logits_tile(q, queue_ptr, offs_d, k0 + tl.arange(0, BLOCK_K), D, K, qu_sd, qu_sk, inv_t,
                            UPCAST, PREC)
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
                        inv_t, UPCAST: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per slice of the queue: sum_j softmax_j * queue[:, j] for each row (unscaled)."""
    pid_b, split = tl.program_id(0), tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, offs_b, offs_d, B, D, q_sb, q_sd, UPCAST)
    lse = tl.load(lse_ptr + offs_b, mask=offs_b < B, other=0.0)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        s, kt = _logits_tile(q, queue_ptr, offs_d, k0 + tl.arange(0, BLOCK_K), D, K, qu_sd, qu_sk, inv_t,
                             UPCAST, PREC)
        p = tl.exp(s - lse[:, None])
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
    upcast = q.dtype != queue.dtype or (INTERPRETED and not q.is_cuda)
    itemsize = 4 if upcast else q.element_size()
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_B = max(16, min(64, next_pow2(B), TILE_BYTES // (BLOCK_D * itemsize)))
    BLOCK_K = max(16, min(128, next_pow2(K), TILE_BYTES // (BLOCK_D * itemsize)))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    n_b = triton.cdiv(B, BLOCK_B)
    tiles = triton.cdiv(K, BLOCK_K)
    k_per_split = triton.cdiv(tiles, max(1, PROGRAMS_PER_SM * sms // n_b)) * BLOCK_K
    fp32 = upcast or q.dtype == torch.float32
    return dict(n_b=n_b, n_split=triton.cdiv(K, k_per_split), k_per_split=k_per_split, UPCAST=upcast,
                PREC="tf32x3" if fp32 else "tf32", BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K)


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
            UPCAST=plan["UPCAST"], PREC=plan["PREC"],
            BLOCK_B=plan["BLOCK_B"], BLOCK_D=plan["BLOCK_D"], BLOCK_K=plan["BLOCK_K"])
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
                UPCAST=plan["UPCAST"], PREC=plan["PREC"],
                BLOCK_B=plan["BLOCK_B"], BLOCK_D=plan["BLOCK_D"], BLOCK_K=plan["BLOCK_K"])
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
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels)


def infonce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy (label 0) of [q.k, q @ queue] / T, mean over rows; q, k [B, D], queue [D, K]."""
    if not use_triton(q):
        return infonce_queue_torch(q, k, queue, temperature)
    return InfoNCEQueueFunction.apply(q, k, queue.detach(), float(temperature))
