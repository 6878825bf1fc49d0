"""The fused CPU BatchNorm + residual add + ReLU (kernels/cpu/batch_norm_act.cpp) computes what torchvision's
blocks compute: forward, backward and running statistics, on irregular shapes, in fp32 and bf16; the trunk
takes it exactly where it applies; the start-up check switches it off when it cannot be built."""
import importlib
import itertools

import pytest
import torch
from torch import nn

from lcr_fast import selfcheck
from lcr_fast.errors import FallbackError
from lcr_fast.kernels import BACKEND, KernelBackend
from lcr_fast.models.backbone import build_backbone

bna = importlib.import_module("lcr_fast.kernels.batch_norm_act")  # the package re-exports the function
SHAPES = [(3, 7, 5, 6), (2, 33, 4, 3), (1, 5, 1, 2), (4, 40, 9, 9)]


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _pair(shape, seed=0):
    """Two BatchNorms with the same random affine parameters and running statistics."""
    torch.manual_seed(seed)
    bns = [nn.BatchNorm2d(shape[1]) for _ in range(2)]
    with torch.no_grad():
        bns[0].weight.uniform_(0.5, 1.5)
        bns[0].bias.uniform_(-0.5, 0.5)
        bns[0].running_mean.uniform_(-1, 1)
    bns[1].load_state_dict(bns[0].state_dict())
    return bns


def _run(mode, bn, x, residual, relu, upstream):
    x = x.clone().requires_grad_()
    residual = residual.clone().requires_grad_() if residual is not None else None
    with BACKEND.using(mode):
        assert bna.fused_applies(x, bn, residual) == (mode == "auto")
        y = bna.batch_norm_act(x, bn, residual, relu)
    y.backward(upstream.to(y.dtype))
    grads = [x.grad, bn.weight.grad, bn.bias.grad] + ([residual.grad] if residual is not None else [])
    return y.detach(), grads


@pytest.mark.parametrize("shape,residual,relu", list(itertools.product(SHAPES, [False, True], [False, True])))
def test_fp32_forward_backward_and_statistics_equal_torchs(shape, residual, relu):
    g = torch.Generator().manual_seed(1)
    x = channels_last(torch.randn(shape, generator=g) * 3 + 1)
    res = channels_last(torch.randn(shape, generator=g)) if residual else None
    upstream = channels_last(torch.randn(shape, generator=g))
    fused_bn, plain_bn = _pair(shape)
    y, grads = _run("auto", fused_bn, x, res, relu, upstream)
    y_ref, grads_ref = _run("torch", plain_bn, x, res, relu, upstream)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused_bn, name), getattr(plain_bn, name), rtol=1e-6, atol=1e-7)
    if relu:
        assert float(y.min()) == 0.0


@pytest.mark.parametrize("shape,residual", [(SHAPES[1], True), (SHAPES[3], False)])
def test_bf16_activations_are_computed_in_float_and_rounded_once(shape, residual):
    """bf16 in and out, float parameters: within bf16's rounding of the fp32 computation on the same values."""
    g = torch.Generator().manual_seed(2)
    x = channels_last(torch.randn(shape, generator=g) * 3 + 1).bfloat16()
    res = channels_last(torch.randn(shape, generator=g)).bfloat16() if residual else None
    upstream = channels_last(torch.randn(shape, generator=g)).bfloat16()
    fused_bn, plain_bn = _pair(shape)
    y, grads = _run("auto", fused_bn, x, res, True, upstream)
    y_ref, grads_ref = _run("torch", plain_bn, x.float(), res.float() if residual else None, True, upstream.float())
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_one_thread_and_two_give_the_same_bits():
    """Sums in chunks cut at fixed rows, added in order: ranks with one thread each, and a run resumed with
    another thread count, compute exactly what one process with two threads does."""
    shape = (8, 24, 16, 16)  # 2048 rows: eight chunks, shared by the threads
    g = torch.Generator().manual_seed(3)
    x, res, upstream = (channels_last(torch.randn(shape, generator=g)) for _ in range(3))
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            bn = _pair(shape)[0]
            outs.append((*_run("auto", bn, x, res, True, upstream), bn.running_var.clone()))
    finally:
        torch.set_num_threads(threads)
    (y1, g1, v1), (y2, g2, v2) = outs
    assert torch.equal(y1, y2) and torch.equal(v1, v2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_a_nan_passes_the_relu_as_torchs_does_and_gets_no_gradient():
    shape = (2, 3, 2, 2)
    x = torch.randn(shape)
    x[0, 1, 0, 0] = float("nan")
    fused_bn, plain_bn = _pair(shape)
    upstream = torch.ones(shape)
    y, (dx, *_) = _run("auto", fused_bn, channels_last(x), None, True, channels_last(upstream))
    y_ref, (dx_ref, *_) = _run("torch", plain_bn, channels_last(x), None, True, channels_last(upstream))
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and bool(torch.isnan(y[:, 1]).all())
    assert torch.equal(torch.isnan(dx), torch.isnan(dx_ref))


def test_where_the_plain_path_is_taken():
    bn = nn.BatchNorm2d(4)
    x = channels_last(torch.randn(2, 4, 3, 3))
    assert bna.fused_applies(x, bn, None)
    assert not bna.fused_applies(x.contiguous(), bn, None)  # NCHW: the operator reads channels_last rows
    assert not bna.fused_applies(x, bn, x.contiguous())
    assert not bna.fused_applies(x.double(), bn, None)
    assert not bna.fused_applies(channels_last(torch.randn(1, 4, 1, 1)), bn, None)  # one value per channel
    with BACKEND.using("torch"):
        assert not bna.fused_applies(x, bn, None)
    assert not bna.fused_applies(x, bn.eval(), None)  # evaluation: running statistics, torch's kernel
    bn.train().momentum = None  # a cumulative average reads the count on the host: torch's path
    assert not bna.fused_applies(x, bn, None)


@pytest.mark.parametrize("shape,residual,relu", [((6, 5, 3, 4), True, True), ((4, 7, 2, 2), False, True),
                                                  ((2, 3, 5, 1), True, False), ((8, 16, 4, 4), False, False)])
def test_two_views_in_one_call_equal_a_call_per_view(shape, residual, relu):
    """``views=2``: each half of the batch normalised by its own statistics, as two BatchNorm calls would; the
    running statistics updated twice, in order; the parameter gradients the sum of the two calls'."""
    g = torch.Generator().manual_seed(5)
    x = channels_last(torch.randn(shape, generator=g) * 2 + 1)
    res = channels_last(torch.randn(shape, generator=g)) if residual else None
    upstream = channels_last(torch.randn(shape, generator=g))
    fused_bn, plain_bn = _pair(shape, seed=3)
    ins = [t.clone().requires_grad_() for t in (x, res) if t is not None]
    assert bna.fused_applies(ins[0], fused_bn, ins[1] if residual else None, views=2)
    y = bna.batch_norm_act(ins[0], fused_bn, ins[1] if residual else None, relu, views=2)
    grads = torch.autograd.grad(y, [*ins, fused_bn.weight, fused_bn.bias], upstream)
    ref_ins = [t.clone().requires_grad_() for t in (x, res) if t is not None]
    with BACKEND.using("torch"):
        halves = [bna.batch_norm_act(part, plain_bn, ref_ins[1].chunk(2)[i] if residual else None, relu)
                  for i, part in enumerate(ref_ins[0].chunk(2))]
    y_ref = torch.cat(halves)
    grads_ref = torch.autograd.grad(y_ref, [*ref_ins, plain_bn.weight, plain_bn.bias], upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    whole_bn = _pair(shape, seed=3)[0]
    assert not torch.allclose(y, bna.batch_norm_act_torch(x, whole_bn, res, relu), atol=1e-3), \
        "the whole batch's statistics give another output"
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused_bn, name), getattr(plain_bn, name), rtol=1e-6, atol=1e-7)
    assert int(fused_bn.num_batches_tracked) == 2


def test_views_that_do_not_split_the_batch_evenly_take_no_fused_path():
    bn = nn.BatchNorm2d(4)
    x = channels_last(torch.randn(3, 4, 2, 2))
    assert bna.fused_applies(x, bn, None) and not bna.fused_applies(x, bn, None, views=2)
    assert not bna.fused_applies(channels_last(torch.randn(2, 4, 1, 1)), bn, None, views=2), "one value per view"
    with pytest.raises(RuntimeError, match="equal groups"):
        bna.batch_norm_act_fused(x, bn, views=2)


def test_the_operator_names_a_wrong_layout():
    bn = nn.BatchNorm2d(4)
    bna.load_operator()
    with pytest.raises(RuntimeError, match="channels_last"):
        bna.batch_norm_act_fused(torch.randn(2, 4, 3, 3), bn)


def _worst(got: dict, want: dict) -> float:
    """The largest difference over tensors, each relative to the largest magnitude of its ``want``."""
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-12)) for k in want)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_trunk_step_equals_torchvisions_ops_to_the_rounding_of_a_layout_change(arch):
    """The whole trunk in training (ResNet-18: BasicBlock; ResNet-50: Bottleneck and downsample): features,
    every gradient and every running statistic differ from torchvision's ops, both channels_last, by no more
    than torchvision's own NCHW and channels_last runs differ from each other (summation order, amplified
    through the BatchNorms); every BatchNorm counted its batch."""
    torch.manual_seed(4)
    base = build_backbone(arch, maxpool=False).train()
    x = torch.randn(4, 3, 64, 64)
    runs, counts = {}, {}
    for name, mode, layout in (("fused", "auto", torch.channels_last), ("torch", "torch", torch.channels_last),
                               ("torch nchw", "torch", torch.contiguous_format)):
        trunk = build_backbone(arch, maxpool=False).train()
        trunk.load_state_dict(base.state_dict())
        trunk = trunk.to(memory_format=layout)
        with BACKEND.using(mode):
            feat = trunk(x.contiguous(memory_format=layout))
        feat.square().mean().backward()
        state = trunk.state_dict()
        counts[name] = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
        runs[name] = {"features": feat.detach(), **{n: p.grad for n, p in trunk.named_parameters()},
                      **{k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}}
    floor = _worst(runs["torch nchw"], runs["torch"])
    assert _worst(runs["fused"], runs["torch"]) <= 2 * floor + 1e-6
    assert counts["fused"] == counts["torch"] and set(counts["fused"].values()) == {1}


def test_under_bf16_autocast_the_trunk_is_as_close_to_fp32_as_torchs_own_bf16():
    """What ``engine.precision: auto`` runs on a CPU with native bf16: convolutions in bf16, so the operator gets
    bf16 activations. Its features and gradients are no further from the fp32 step than torchvision's ops
    under the same autocast are (each rounds differently: torch after the BatchNorm, the add and the ReLU,
    the operator once)."""
    torch.manual_seed(5)
    base = build_backbone("resnet18", maxpool=False).train()
    x = channels_last(torch.randn(4, 3, 64, 64))
    runs = {}
    for name, mode, autocast in (("fused", "auto", True), ("torch", "torch", True), ("fp32", "torch", False)):
        trunk = build_backbone("resnet18", maxpool=False).train()
        trunk.load_state_dict(base.state_dict())
        trunk = trunk.to(memory_format=torch.channels_last)
        with BACKEND.using(mode), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            feat = trunk(x)
        assert feat.dtype == (torch.bfloat16 if autocast else torch.float32)
        feat.float().square().mean().backward()
        runs[name] = {"features": feat.detach().float(), **{n: p.grad for n, p in trunk.named_parameters()}}

    def error(name):
        return max(float((runs[name][k] - v).norm() / v.norm().clamp(min=1e-12)) for k, v in runs["fp32"].items())

    assert error("fused") <= 1.5 * error("torch")


def test_the_start_up_check_records_the_operator_and_falls_back_without_it(monkeypatch):
    cpu = torch.device("cpu")
    backend = KernelBackend()
    both = (torch.float32, torch.bfloat16)
    assert selfcheck.check_cpu_kernels(cpu, True, dtypes=both, backend=backend)["batch_norm_act"].startswith("cpu (C++")
    assert selfcheck.check_cpu_kernels(cpu, False, backend=backend)["batch_norm_act"].startswith("torch (")

    def broken():
        raise RuntimeError("Error building extension 'lcr_fast_batch_norm_act': no compiler")

    monkeypatch.setattr(bna, "load_operator", broken)
    with pytest.warns(UserWarning, match="using torch's BatchNorm and ReLU instead"):
        path = selfcheck.check_cpu_kernels(cpu, True, backend=backend)["batch_norm_act"]
    assert path.startswith("torch (fallback: RuntimeError: Error building extension")
    assert "batch_norm_act" in backend.disabled()
    with pytest.raises(FallbackError, match="batch_norm_act"):
        selfcheck.check_cpu_kernels(cpu, True, strict=True, backend=KernelBackend())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_trunk_takes_two_views_as_one_batch_as_it_takes_each_alone(arch):
    """``forward(cat, views=2)``, which BYOL runs where ``batches_views`` says so: each view's features, every
    gradient and every running statistic as two calls give them, to the rounding of a batch twice the size in the
    convolutions."""
    torch.manual_seed(6)
    trunks = [build_backbone(arch, maxpool=False).train().to(memory_format=torch.channels_last) for _ in range(2)]
    trunks[1].load_state_dict(trunks[0].state_dict())
    views = [channels_last(torch.randn(3, 3, 48, 48)) for _ in range(2)]
    assert trunks[0].batches_views(views[0])
    joint = trunks[0](torch.cat(views), views=2)
    apart = torch.cat([trunks[1](v) for v in views])
    (joint.square().mean() + joint[:3].mean()).backward()
    (apart.square().mean() + apart[:3].mean()).backward()
    runs = [{"features": f.detach(), **{n: p.grad for n, p in t.named_parameters()},
             **{k: v for k, v in t.state_dict().items() if k.endswith(("running_mean", "running_var"))}}
            for f, t in zip((joint, apart), trunks)]
    assert _worst(*runs) < 1e-4
    counts = [{k: int(v) for k, v in t.state_dict().items() if k.endswith("num_batches_tracked")} for t in trunks]
    assert counts[0] == counts[1] and set(counts[0].values()) == {2}


def test_a_trunk_batches_views_only_where_every_batch_norm_is_fused():
    trunk = build_backbone("resnet18", maxpool=False).train().to(memory_format=torch.channels_last)
    x = channels_last(torch.randn(2, 3, 32, 32))
    assert trunk.batches_views(x)
    assert not trunk.batches_views(x.contiguous()), "NCHW: torch's BatchNorm, which would split and concatenate"
    with BACKEND.using("torch"):
        assert not trunk.batches_views(x)
    assert not trunk.eval().batches_views(x), "evaluation: running statistics, nothing per view"
    trunk.train().forward = trunk.forward  # what compile_backbones does: a forward set on the instance
    assert not trunk.batches_views(x), "a compiled trunk's BatchNorms take the plain path"
