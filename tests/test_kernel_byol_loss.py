"""Triton BYOL loss against -cosine_similarity(p, z.detach()).mean(), symmetrised."""
import pytest
import torch

from lcr_fast.kernels import byol_loss, byol_loss_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: the reference rounds norms, quotients and the mean to bf16; the kernel keeps fp32
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}


pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("B,D", [(3, 37), (5, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(B, D, dtype):
    gen = torch.Generator().manual_seed(0)
    p1, z2, p2, z1 = (torch.randn(B, D, generator=gen).to(DEVICE, dtype).requires_grad_(True) for _ in range(4))
    with torch.no_grad():  # correlate the pairs so the loss is far from zero
        p1 += z2
        p2 += 2 * z1
    loss = byol_loss(p1, z2, p2, z1)
    ref = byol_loss_torch(p1, z2, p2, z1)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss < -0.5
    torch.testing.assert_close(loss, ref, **TOL[dtype])

    up = torch.rand((), generator=gen).to(DEVICE) + 0.5
    grads = torch.autograd.grad(loss, (p1, z2, p2, z1), up, allow_unused=True)
    refs = torch.autograd.grad(ref, (p1, p2), up)
    assert grads[1] is None and grads[3] is None  # targets are detached
    for g, r in zip((grads[0], grads[2]), refs):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, **TOL[dtype])


def test_eps_of_cosine_similarity():
    gen = torch.Generator().manual_seed(1)
    p1, z2, p2, z1 = (torch.randn(4, 16, generator=gen).to(DEVICE) for _ in range(4))
    p1[1] = 0.0           # zero prediction: norm clamped to 1e-8, norm gradient zero
    p1[2] *= 1e-10        # below eps: clamped value, but gradient through the unclamped norm
    z2[3] = 0.0           # zero target
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    loss = byol_loss(p1, z2, p2, z1)
    ref = byol_loss_torch(p1, z2, p2, z1)
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    grads = torch.autograd.grad(loss, (p1, p2))
    for g, r in zip(grads, torch.autograd.grad(ref, (p1, p2))):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert grads[0][1].abs().max() > 1e6  # 1/eps scale, as in torch
