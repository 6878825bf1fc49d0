"""Rationale loss: KL(softmax(cam / t) || softmax(att / t)), summed over rows and batch.

Eager torch runs ~10 kernels (two casts, scales, softmaxes, a log, kl_div, a sum) and as many again
backward. Here one pass per row computes both log-softmaxes, the row's KL and, when autograd needs
them, both input gradients; backward only scales them by the upstream gradient. Rows are a
sample's flattened h*w (``flatten=True``, BYOL) or the last axis alone (``flatten=False``, MoCo:
the reference's ``view`` keeps h as a batch axis there).
"""
import torch
import torch.nn.functional as F

from .dispatch import next_pow2, tl, triton, use_triton

MAX_BLOCK_N = 16384
ELEMS_PER_PROGRAM = 1024


@triton.jit
def _kl_fwd_kernel(cam_ptr, att_ptr, loss_ptr, dcam_ptr, datt_ptr, R, N, inv_t,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr, WITH_GRAD: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols[None, :] < N
    mask = (rows[:, None] < R) & col_ok
    # rows past the end re-read the last row, so no lane works on an all-padding row (NaNs)
    offs = tl.minimum(rows, R - 1)[:, None] * N + cols[None, :]
    x = tl.load(cam_ptr + offs, mask=col_ok, other=0.0).to(tl.float32) * inv_t
    y = tl.load(att_ptr + offs, mask=col_ok, other=0.0).to(tl.float32) * inv_t
    x = tl.where(col_ok, x, float("-inf"))
    y = tl.where(col_ok, y, float("-inf"))
    x = x - tl.max(x, axis=1)[:, None]
    y = y - tl.max(y, axis=1)[:, None]
    ex = tl.exp(x)
    ey = tl.exp(y)
    sx = tl.sum(ex, axis=1)
    sy = tl.sum(ey, axis=1)
    p = ex / sx[:, None]
    # padding leaves -inf in x and y; zero it before subtracting them (-inf - -inf is NaN)
    log_ratio = (tl.log(sx) - tl.log(sy))[:, None]
    lp_lq = tl.where(col_ok, tl.where(col_ok, x, 0.0) - tl.where(col_ok, y, 0.0) - log_ratio, 0.0)
    # kl_div's xlogy: a zero target contributes zero even where log q is very negative
    kl = tl.sum(tl.where(p > 0, p * lp_lq, 0.0), axis=1)
    tl.store(loss_ptr + rows, kl, mask=rows < R)
    if WITH_GRAD:
        q = ey / sy[:, None]
        dx = p * (lp_lq - kl[:, None]) * inv_t  # p is 0 on padding
        dy = (q - p) * inv_t
        tl.store(dcam_ptr + offs, dx, mask=mask)
        tl.store(datt_ptr + offs, dy, mask=mask)


def _rows(x: torch.Tensor, flatten: bool) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if flatten else x.reshape(-1, x.shape[-1])


class RationaleKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cam: torch.Tensor, att: torch.Tensor, temperature: float, flatten: bool) -> torch.Tensor:
        c, a = _rows(cam, flatten).contiguous(), _rows(att, flatten).contiguous()
        R, N = c.shape
        BLOCK_N = max(16, next_pow2(N))
        if BLOCK_N > MAX_BLOCK_N:
            raise ValueError(f"rationale_kl keeps a row in registers; rows of {N} exceed {MAX_BLOCK_N}")
        ROWS = max(1, min(next_pow2(R), ELEMS_PER_PROGRAM // BLOCK_N))
        with_grad = any(ctx.needs_input_grad[:2])
        loss_rows = torch.empty(R, device=c.device, dtype=torch.float32)
        if with_grad:
            dcam = torch.empty((R, N), device=c.device, dtype=torch.float32)
            datt = torch.empty_like(dcam)
        else:
            dcam = datt = loss_rows  # never written when WITH_GRAD is off
        _kl_fwd_kernel[(triton.cdiv(R, ROWS),)](c, a, loss_rows, dcam, datt, R, N, 1.0 / temperature,
                                                ROWS=ROWS, BLOCK_N=BLOCK_N, WITH_GRAD=with_grad)
        if with_grad:
            ctx.save_for_backward(dcam, datt)
        ctx.meta = (cam.shape, cam.dtype, att.shape, att.dtype)
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        dcam, datt = ctx.saved_tensors
        cam_shape, cam_dtype, att_shape, att_dtype = ctx.meta
        g_cam = (dcam * dloss).to(cam_dtype).reshape(cam_shape) if ctx.needs_input_grad[0] else None
        g_att = (datt * dloss).to(att_dtype).reshape(att_shape) if ctx.needs_input_grad[1] else None
        return g_cam, g_att, None, None


def rationale_kl_torch(cam: torch.Tensor, att: torch.Tensor, temperature: float, flatten: bool) -> torch.Tensor:
    p_logits = _rows(cam, flatten).float() / temperature
    q_logits = _rows(att, flatten).float() / temperature
    return F.kl_div(q_logits.softmax(-1).log(), p_logits.softmax(-1), reduction="sum")


def rationale_kl(cam: torch.Tensor, att: torch.Tensor, temperature: float, flatten: bool) -> torch.Tensor:
    """sum over rows of KL(softmax(cam/t) || softmax(att/t)); fp32 scalar, gradients to both."""
    if not use_triton(cam, op="rationale_kl"):
        return rationale_kl_torch(cam, att, temperature, flatten)
    return RationaleKLFunction.apply(cam, att, float(temperature), bool(flatten))
