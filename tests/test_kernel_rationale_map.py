"""Triton rationale map against max(relu(y), 1) then batch-wide (or per-sample) min-max scaling."""
import pytest
import torch

from lcr_fast.kernels import rationale_map, rationale_map_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


pytestmark = pytest.mark.usefixtures("triton_kernels")


def _check(y, per_sample, up):
    y = y.detach().requires_grad_(True)
    out = rationale_map(y, per_sample)
    ref = rationale_map_torch(y, per_sample)
    assert out.dtype == y.dtype and out.shape == ref.shape
    if y.dtype == torch.float32 or y.is_cuda:
        # the kernel rounds where the eager composition rounds: bit-identical
        assert torch.equal(out, ref)
    else:
        # Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding: one bf16 step apart
        torch.testing.assert_close(out, ref, atol=2.0**-8, rtol=0)
    (dy,) = torch.autograd.grad(out, y, up)
    (dref,) = torch.autograd.grad(ref, y, up)
    torch.testing.assert_close(dy, dref, **GRAD_TOL[y.dtype])
    return out, dy


@pytest.mark.parametrize("shape", [(3, 37, 13, 1), (3, 37, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_matches_torch(shape, dtype, per_sample):
    gen = torch.Generator().manual_seed(1)
    # shifted down so that some pixels have no positive channel: relu makes exact zeros there
    y = (torch.randn(shape, generator=gen) - 2.0).to(DEVICE, dtype)
    up = torch.randn(shape[0], *shape[2:], generator=gen).to(DEVICE, dtype)
    out, _ = _check(y, per_sample, up)
    assert (out == 0).sum() > 1  # the min ties, which is what the backward must spread over
    if per_sample:
        assert torch.allclose(out.flatten(1).amax(1).float(), torch.ones(shape[0], device=DEVICE), atol=1e-2)


def test_ties_at_min_and_max_spread_evenly():
    y = torch.full((3, 37, 3, 5), -1.0)
    y[0, 3, 0, 0] = 2.0  # two maxima in different samples, channels in different K chunks
    y[2, 36, 1, 4] = 2.0
    y[1, 5, 2, 2] = 0.75
    y[1, 33, 0, 1] = 1.25
    up = torch.randn(3, 3, 5, generator=torch.Generator().manual_seed(2))
    out, dy = _check(y.to(DEVICE), False, up.to(DEVICE))
    assert out.max() == out[0, 0, 0] == out[2, 1, 4]
    # each tied maximum receives half of d/d max, on its own channel only
    assert dy[0, 3, 0, 0] != 0 and dy[2, 36, 1, 4] != 0 and dy[0, :3, 0, 0].eq(0).all()
