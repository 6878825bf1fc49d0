"""Triton InfoNCE with a queue against cross_entropy(cat([q.k, q @ queue]) / T, 0)."""
import pytest
import torch
import torch.nn.functional as F

from lcr_fast.kernels import infonce_queue, infonce_queue_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: 3xTF32 products on GPU. bf16: the reference rounds logits to bf16 (up to 4e-3 here)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("B,D,K", [(3, 37, 70), (5, 16, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(B, D, K, dtype):
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, D, generator=gen), dim=1).to(DEVICE, dtype).requires_grad_(True)
    k = F.normalize(torch.randn(B, D, generator=gen), dim=1).to(DEVICE, dtype).requires_grad_(True)
    queue = F.normalize(torch.randn(D, K, generator=gen), dim=0).to(DEVICE, dtype)
    loss = infonce_queue(q, k, queue, 0.2)
    ref = infonce_queue_torch(q, k, queue, 0.2)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    assert loss > 1.0

    up = torch.rand((), generator=gen).to(DEVICE) + 0.5
    grads = torch.autograd.grad(loss, (q, k), up)
    refs = torch.autograd.grad(ref, (q, k), up)
    for g, r in zip(grads, refs):
        assert g.dtype == dtype and g.abs().max() > 1e-2
        torch.testing.assert_close(g, r, **TOL[dtype])


def test_only_q_needs_grad():
    gen = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(4, 16, generator=gen), dim=1).to(DEVICE).requires_grad_(True)
    k = F.normalize(torch.randn(4, 16, generator=gen), dim=1).to(DEVICE)
    queue = F.normalize(torch.randn(16, 50, generator=gen), dim=0).to(DEVICE)
    (dq,) = torch.autograd.grad(infonce_queue(q, k, queue, 0.07), q)
    (dref,) = torch.autograd.grad(infonce_queue_torch(q, k, queue, 0.07), q)
    torch.testing.assert_close(dq, dref, **TOL[torch.float32])
