"""Triton rationale KL against kl_div(softmax(att/t).log(), softmax(cam/t), reduction='sum')."""
import pytest
import torch

from lcr_fast.kernels import rationale_kl, rationale_kl_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# both sides compute in fp32 from the same inputs; bf16 only changes the dtype of the gradients
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(atol=1e-3, rtol=1e-2)}


pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("shape", [(3, 13, 1), (3, 3, 5), (2, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flatten,t", [(True, 0.4), (False, 1.0)])
def test_matches_torch(shape, dtype, flatten, t):
    gen = torch.Generator().manual_seed(0)
    cam = (torch.randn(shape, generator=gen).relu() * 3).to(DEVICE, dtype).requires_grad_(True)
    att = torch.rand(shape, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    loss = rationale_kl(cam, att, t, flatten)
    ref = rationale_kl_torch(cam, att, t, flatten)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, **LOSS_TOL)
    if flatten or shape[-1] > 1:
        assert loss > 0.01

    up = torch.rand((), generator=gen).to(DEVICE) + 0.5
    grads = torch.autograd.grad(loss, (cam, att), up)
    refs = torch.autograd.grad(ref, (cam, att), up)
    for g, r in zip(grads, refs):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, **GRAD_TOL[dtype])


def test_without_grad_returns_loss_only():
    cam, att = torch.rand(2, 3, 5, device=DEVICE), torch.rand(2, 3, 5, device=DEVICE)
    torch.testing.assert_close(rationale_kl(cam, att, 0.4, True), rationale_kl_torch(cam, att, 0.4, True), **LOSS_TOL)
