"""BYOL's MLP head taking both views as one batch: the same numbers as one call per view."""
import copy

import pytest
import torch

from lcr_fast.models.heads import MLP


@pytest.mark.parametrize("rows", [3, 8])
def test_views_in_one_call_equal_a_call_per_view(rows):
    torch.manual_seed(0)
    joint = MLP(24, 40, 12).train()
    apart = copy.deepcopy(joint)
    x = torch.randn(2 * rows, 24) * 3 + 1
    x_joint, x_apart = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_joint = joint(x_joint, views=2)
    out_apart = torch.cat([apart(x_apart[:rows]), apart(x_apart[rows:])])
    torch.testing.assert_close(out_joint, out_apart, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(out_joint)
    (out_joint * weights).sum().backward()
    (out_apart * weights).sum().backward()
    torch.testing.assert_close(x_joint.grad, x_apart.grad, rtol=1e-5, atol=1e-6)
    # A weight's gradient is one sum over both views' rows instead of two added: float rounding apart, relative
    # to the gradient's scale (an element that nearly cancels has a large relative error of its own); the first
    # layer's bias, which the BatchNorm after it cancels, has a gradient of float noise around zero.
    for (name, a), b in zip(joint.named_parameters(), apart.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * float(b.grad.abs().max()) + 1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # BatchNorm's running statistics moved twice, view 1 then view 2, as two calls move them.
    for (name, a), b in zip(joint.named_buffers(), apart.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert int(joint.layer1[1].num_batches_tracked) == 2


def test_one_batch_of_two_views_is_not_one_batchnorm_over_both():
    # The per-view statistics are what keeps the reference's numbers: over the joint batch they differ.
    torch.manual_seed(0)
    head = MLP(24, 40, 12).train()
    x = torch.cat([torch.randn(4, 24), torch.randn(4, 24) * 5 + 3])
    per_view = head(x, views=2)
    joint = copy.deepcopy(head)(x)
    assert (per_view - joint).abs().max() > 0.1
