"""Triton GradCAM against relu((feat * grad).sum(1)), forward and backward."""
import pytest
import torch

from lcr_fast.kernels import gradcam, gradcam_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: only the order of the channel sum differs. bf16: both sides round sums/products to bf16.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("shape", [(3, 37, 13, 1), (3, 37, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torch(shape, dtype, channels_last):
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    feat.requires_grad_(True)
    grad.requires_grad_(True)

    cam = gradcam(feat, grad)
    ref = gradcam_torch(feat, grad)
    assert cam.dtype == dtype and cam.shape == (shape[0], *shape[2:])
    torch.testing.assert_close(cam, ref, **TOL[dtype])
    assert (cam >= 0).all() and (cam == 0).any() and (cam > 0).any()

    up = torch.randn(cam.shape, generator=gen).to(DEVICE, dtype)
    dfeat, dgrad = torch.autograd.grad(cam, (feat, grad), up, allow_unused=True)
    (dref,) = torch.autograd.grad(ref, feat, up)
    assert dgrad is None  # grad is a constant: dL/dfeat taken without create_graph
    torch.testing.assert_close(dfeat, dref, **TOL[dtype])
    assert dfeat.is_contiguous(memory_format=torch.channels_last) == channels_last or shape[3] == 1
