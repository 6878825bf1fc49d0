"""Triton rationale pooling against F.normalize((feat * att[:, None]).mean((2, 3)), dim=1)."""
import importlib

import pytest
import torch

from lcr_fast.kernels import rationale_pool, rationale_pool_torch

# The package exports the function under the module's name: the module itself, for monkeypatching.
rationale_pool_module = importlib.import_module("lcr_fast.kernels.rationale_pool")
triton_pool = rationale_pool_module._rationale_pool_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}


pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("shape", [(3, 37, 13, 1), (3, 37, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torch(shape, dtype, channels_last, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    att = torch.rand(shape[0], *shape[2:], generator=gen).to(DEVICE, dtype)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    launched = []
    monkeypatch.setattr(rationale_pool_module, "_rationale_pool_triton",
                        lambda f, a: launched.append(1) or triton_pool(f, a))
    with torch.no_grad():
        out = rationale_pool(feat, att)
    ref = rationale_pool_torch(feat, att)
    assert launched and out.dtype == dtype and out.shape == (shape[0], shape[1])
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(out.float().norm(dim=1), torch.ones(shape[0], device=DEVICE), atol=1e-2, rtol=0)


def test_a_call_to_differentiate_takes_the_torch_path(monkeypatch):
    """The kernel has no backward; autograd still gets the exact gradients of the torch formula."""
    monkeypatch.setattr(rationale_pool_module, "_rationale_pool_triton", lambda f, a: pytest.fail("kernel launched"))
    gen = torch.Generator().manual_seed(2)
    feat = torch.randn(3, 37, 3, 5, generator=gen).to(DEVICE).requires_grad_(True)
    att = torch.rand(3, 3, 5, generator=gen).to(DEVICE).requires_grad_(True)
    out = rationale_pool(feat, att)
    up = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, (feat, att), up)
    refs = torch.autograd.grad(rationale_pool_torch(feat, att), (feat, att), up)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_zero_weights_hit_eps():
    gen = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 37, 3, 5, generator=gen).to(DEVICE)
    att = torch.zeros(2, 3, 5, device=DEVICE)
    with torch.no_grad():
        out = rationale_pool(feat, att)
    assert torch.equal(out, torch.zeros_like(out))
