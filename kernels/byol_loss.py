"""BYOL loss: D(p1, z2) / 2 + D(p2, z1) / 2 with D(p, z) = -mean cos(p, stopgrad(z)).

One pass over the four [B, D] tensors gives the loss and, when needed, dL/dp1 and dL/dp2; backward
only scales them. The cosine follows torch's ``F.cosine_similarity`` (eps 1e-8): each vector is
divided by max(norm, eps), but that clamp happens under no_grad, so the gradient differentiates
the *unclamped* norm (and a zero vector's norm gets zero gradient, as linalg_vector_norm gives).
"""
import torch
import torch.nn.functional as F

from .dispatch import next_pow2, tl, triton, use_triton

COS_EPS = 1e-8
ELEMS_PER_PROGRAM = 2048


@triton.jit
def _neg_half_mean_cos(p_ptr, z_ptr, dp_ptr, rows, B, D, scale, eps,
                       BLOCK_D: tl.constexpr, WITH_GRAD: tl.constexpr):
    """Per row: scale * cos(p, z); stores scale * dcos/dp when WITH_GRAD."""
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < B) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n_p = tl.sqrt(tl.sum(p * p, axis=1))
    c_p = tl.maximum(n_p, eps)
    z_hat = z / tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), eps)[:, None]
    cos = tl.sum((p / c_p[:, None]) * z_hat, axis=1)
    if WITH_GRAD:
        inv_n = tl.where(n_p > 0, 1.0 / tl.where(n_p > 0, n_p, 1.0), 0.0)
        dp = (z_hat - (cos * inv_n)[:, None] * p) / c_p[:, None]
        tl.store(dp_ptr + offs, dp * scale, mask=mask)
    return cos * scale


@triton.jit
def _byol_fwd_kernel(p1_ptr, z2_ptr, p2_ptr, z1_ptr, loss_ptr, dp1_ptr, dp2_ptr, B, D, scale, eps,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr, WITH_GRAD: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    l1 = _neg_half_mean_cos(p1_ptr, z2_ptr, dp1_ptr, rows, B, D, scale, eps, BLOCK_D, WITH_GRAD)
    l2 = _neg_half_mean_cos(p2_ptr, z1_ptr, dp2_ptr, rows, B, D, scale, eps, BLOCK_D, WITH_GRAD)
    tl.store(loss_ptr + rows, l1 + l2, mask=rows < B)


class BYOLLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        p1, z2, p2, z1 = (t.contiguous() for t in (p1, z2, p2, z1))
        B, D = p1.shape
        BLOCK_D = max(16, next_pow2(D))
        ROWS = max(1, min(next_pow2(B), ELEMS_PER_PROGRAM // BLOCK_D))
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        loss_rows = torch.empty(B, device=p1.device, dtype=torch.float32)
        if with_grad:
            dp1 = torch.empty((B, D), device=p1.device, dtype=torch.float32)
            dp2 = torch.empty_like(dp1)
        else:
            dp1 = dp2 = loss_rows  # never written when WITH_GRAD is off
        _byol_fwd_kernel[(triton.cdiv(B, ROWS),)](p1, z2, p2, z1, loss_rows, dp1, dp2, B, D, -0.5 / B, COS_EPS,
                                                 ROWS=ROWS, BLOCK_D=BLOCK_D, WITH_GRAD=with_grad)
        if with_grad:
            ctx.save_for_backward(dp1, dp2)
        ctx.dtypes = (p1.dtype, p2.dtype)
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        dp1, dp2 = ctx.saved_tensors
        g1 = (dp1 * dloss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        g2 = (dp2 * dloss).to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return g1, None, g2, None


def _neg_cos(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def byol_loss_torch(p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    return (_neg_cos(p1, z2) / 2 + _neg_cos(p2, z1) / 2).float()


def byol_loss(p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Symmetrised negative cosine of predictions [B, D] against detached targets; fp32 scalar."""
    if not use_triton(p1, op="byol_loss"):
        return byol_loss_torch(p1, z2, p2, z1)
    return BYOLLossFunction.apply(p1, z2.detach(), p2, z1.detach())
