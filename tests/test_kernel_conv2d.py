"""The trunk's stride-1 convolutions with the weight gradient as matrix products (kernels/conv2d.py) compute what
nn.Conv2d computes, forward and backward, on irregular shapes; the trunk takes the path exactly where it applies;
torch's FLOP counter and the step profiler see the convolution's work as a convolution's."""
import importlib
import os
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lcr_fast.kernels import BACKEND
from lcr_fast.models.backbone import build_backbone

c2 = importlib.import_module("lcr_fast.kernels.conv2d")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
op_profile = importlib.import_module("op_profile")

# (batch, in, out, kernel, height, width): odd sizes, one-pixel images, more channels out than in and fewer.
SHAPES = [(3, 5, 7, 3, 9, 6), (2, 4, 6, 1, 5, 7), (1, 3, 2, 3, 1, 1), (4, 16, 8, 3, 4, 11), (2, 9, 3, 1, 1, 13),
          (5, 2, 11, 3, 2, 3)]


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _conv(c_in, c_out, kernel, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("n,c_in,c_out,kernel,h,w", SHAPES)
def test_forward_and_both_gradients_equal_nn_conv2ds(n, c_in, c_out, kernel, h, w):
    g = torch.Generator().manual_seed(1)
    conv = _conv(c_in, c_out, kernel)
    x = channels_last(torch.randn(n, c_in, h, w, generator=g)).requires_grad_()
    upstream = channels_last(torch.randn(n, c_out, h, w, generator=g))
    assert c2.gemm_applies(conv, x)
    y = c2.conv2d(conv, x)
    grads = torch.autograd.grad(y, [x, conv.weight], upstream)
    y_ref = conv(x)
    grads_ref = torch.autograd.grad(y_ref, [x, conv.weight], upstream)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the same oneDNN forward
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=0, atol=0)  # and input gradient
    torch.testing.assert_close(grads[1], grads_ref[1], rtol=1e-5, atol=1e-5)
    assert grads[1].is_contiguous(memory_format=torch.channels_last), "the weight's own layout"
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("n,c_in,c_out,kernel,h,w", SHAPES)
def test_weight_gradient_alone_against_atens(n, c_in, c_out, kernel, h, w):
    g = torch.Generator().manual_seed(2)
    x = channels_last(torch.randn(n, c_in, h, w, generator=g))
    grad = channels_last(torch.randn(n, c_out, h, w, generator=g))
    weight = channels_last(torch.randn(c_out, c_in, kernel, kernel, generator=g))
    torch.testing.assert_close(c2.weight_grad_gemm(grad, x, kernel), c2.weight_grad_torch(grad, x, weight, kernel // 2),
                               rtol=1e-5, atol=1e-5)


def test_a_frozen_weight_gets_no_gradient_and_a_leaf_input_none():
    conv = _conv(4, 6, 3)
    conv.weight.requires_grad_(False)
    x = channels_last(torch.randn(2, 4, 5, 5)).requires_grad_()
    assert not c2.gemm_applies(conv, x), "nothing to compute: ATen's path"
    conv.weight.requires_grad_(True)
    x = channels_last(torch.randn(2, 4, 5, 5))  # an image batch: no input gradient
    c2.conv2d(conv, x).sum().backward()
    want = torch.autograd.grad(conv(x).sum(), conv.weight)[0]
    torch.testing.assert_close(conv.weight.grad, want, rtol=1e-5, atol=1e-5)


def test_it_applies_only_where_it_was_measured():
    x = channels_last(torch.randn(2, 4, 6, 6))
    assert c2.gemm_applies(_conv(4, 6, 3), x) and c2.gemm_applies(_conv(4, 6, 1), x)
    strided = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    seven = nn.Conv2d(4, 6, 7, padding=3, bias=False)
    biased = nn.Conv2d(4, 6, 3, padding=1)
    unpadded = nn.Conv2d(4, 6, 3, bias=False)
    for conv in (strided, seven, biased, unpadded):
        assert not c2.gemm_applies(conv, x)
    conv = _conv(4, 6, 3)
    assert not c2.gemm_applies(conv, x.contiguous()), "channels_last rows only"
    assert not c2.gemm_applies(conv, x.double())
    with torch.no_grad():
        assert not c2.gemm_applies(conv, x), "no gradient to compute"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not c2.gemm_applies(conv, x), "bf16 keeps oneDNN (unmeasured on a CPU without native bf16)"
    with BACKEND.using("torch"):
        assert not c2.gemm_applies(conv, x)
    with BACKEND.using():
        BACKEND.disable(c2.OP, "test")
        assert not c2.gemm_applies(conv, x)
    assert c2.gemm_applies(conv, x), "the switch ends with the block"


def test_the_trunk_takes_it_for_each_stride_one_convolution_and_trains_as_before():
    torch.manual_seed(0)
    trunks = [build_backbone("resnet18", maxpool=False).train().to(memory_format=torch.channels_last)
              for _ in range(2)]
    trunks[1].load_state_dict(trunks[0].state_dict())
    x = channels_last(torch.randn(2, 3, 32, 32))
    calls = []
    real = c2._Conv2dGemmWeightGrad.apply

    def counted(*args):
        calls.append(args[1].shape)
        return real(*args)

    c2._Conv2dGemmWeightGrad.apply = counted
    try:
        trunks[0](x).square().sum().backward()
    finally:
        c2._Conv2dGemmWeightGrad.apply = real
    # ResNet-18: 16 3x3 convolutions in its blocks, 3 of them stride 2; the stem and the 1x1 downsamples stride 2.
    assert len(calls) == 13 and all(s[-1] == 3 for s in calls)
    with BACKEND.using():
        BACKEND.disable(c2.OP, "test")
        trunks[1](x).square().sum().backward()
    for (name, p), q in zip(trunks[0].named_parameters(), trunks[1].parameters()):
        # Sums over a whole batch in another order: rounding of the gradient's largest entries (~1e-6 of them).
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5 * q.grad.abs().max().item(), msg=name)


def test_the_flop_counter_counts_the_convolutions_flops_not_the_padded_products():
    conv = _conv(16, 32, 3)
    x = channels_last(torch.randn(2, 16, 7, 7)).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        c2.conv2d(conv, x).sum().backward()
    one_pass = 2 * 2 * 7 * 7 * 16 * 32 * 9
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts == {"aten.convolution": one_pass, "aten.convolution_backward": one_pass,
                      "lcr_fast.conv2d_weight_grad": one_pass}


def test_the_profiler_counts_what_runs_inside_a_convolution_as_convolution_time():
    conv = _conv(8, 8, 3)
    x = channels_last(torch.randn(2, 8, 12, 12)).requires_grad_()

    def step(i, a, b):
        loss = c2.conv2d(conv, a).sum() + (b @ b.t()).sum()
        loss.backward()
        return loss.detach()

    prof = op_profile.profile_steps(step, x, torch.randn(64, 64), 0, 2)
    keys = {r.key: r for r in prof.rows}
    assert "aten::mm (inside a convolution)" in keys and "aten::mm" in keys, "the weight gradient's and b @ b.t()"
    assert keys["aten::mm (inside a convolution)"].count == 2 * 9
    conv_us = sum(r.self_us for r in prof.rows if r.nested or op_profile.is_convolution(r.name))
    assert prof.convolution_share == pytest.approx(conv_us / sum(r.self_us for r in prof.rows))
    assert 0 < prof.convolution_share < 1
    assert not any(r.nested for r in prof.rows if r.name == "aten::mm" and r.count == 2), "b @ b.t() is outside"
