"""A whole BYOL + LCR step through the Triton kernels equals the same step through the torch references."""
import copy

import pytest
import torch

from lcr_fast.kernels import BACKEND
from lcr_fast.models import build_model

from helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(model, x1, x2):
    model.momentum_update()
    out = model(x1, x2)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss"], params)
    return out, dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads))


def test_triton_step_equals_torch_step():
    torch.manual_seed(0)
    model = build_model(tiny_config(model={"proj_hidden_dim": 48, "proj_dim": 24})).train()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(3, 3, 48, 48, generator=g), torch.randn(3, 3, 48, 48, generator=g)

    with BACKEND.using("torch"):
        expected, expected_grads = _step(model, x1, x2)
    with BACKEND.using("triton"):
        got, got_grads = _step(twin, x1, x2)

    for key in ("loss", "ssl_loss", "rationale_loss", "gradcam", "attention"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert got["gradcam"].abs().sum() > 0 and got["attention"].shape == (3, 3, 3)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), f"EMA differs on {name}"
