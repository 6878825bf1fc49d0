"""Triton rationale pooling against F.normalize((feat * att[:, None]).mean((2, 3)), dim=1)."""
import pytest
import torch

from lcr_fast.kernels import rationale_pool, rationale_pool_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}


pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("shape", [(3, 37, 13, 1), (3, 37, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torch(shape, dtype, channels_last):
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    att = torch.rand(shape[0], *shape[2:], generator=gen).to(DEVICE, dtype).requires_grad_(True)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    feat.requires_grad_(True)
    out = rationale_pool(feat, att)
    ref = rationale_pool_torch(feat, att)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1])
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(out.float().norm(dim=1), torch.ones(shape[0], device=DEVICE), atol=1e-2, rtol=0)

    up = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (feat, att), up)
    refs = torch.autograd.grad(ref, (feat, att), up)
    for g, r in zip(grads, refs):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, **TOL[dtype])


def test_zero_weights_hit_eps():
    gen = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 37, 3, 5, generator=gen).to(DEVICE).requires_grad_(True)
    att = torch.zeros(2, 3, 5, device=DEVICE, requires_grad=True)
    out = rationale_pool(feat, att)
    assert torch.equal(out, torch.zeros_like(out))
    up = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, (feat, att), up)
    refs = torch.autograd.grad(rationale_pool_torch(feat, att), (feat, att), up)
    assert refs[1].abs().max() > 1e9  # below eps the norm is clamped: gradients scale with 1/eps
    for g, r in zip(grads, refs):
        # datt sums 37 terms of size ~1e11 with cancellation: fp32 summation order shows at ~1e-4
        torch.testing.assert_close(g, r, atol=1e-3, rtol=2e-4)
