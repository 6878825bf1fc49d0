"""LCR_KERNELS dispatch: read per call, validated, auto keeps CPU tensors on the torch reference."""
import importlib

import pytest
import torch

import lcr_fast.kernels as K
from lcr_fast.kernels import dispatch

gradcam_module = importlib.import_module("lcr_fast.kernels.gradcam")  # the package re-exports the function


def test_bad_value_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("LCR_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        K.gradcam(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2))


def test_auto_uses_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("LCR_KERNELS", "auto")

    def refuse(*args):
        raise AssertionError("auto launched Triton on a CPU tensor")

    monkeypatch.setattr(gradcam_module.GradCAMFunction, "apply", refuse)
    feat, grad = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    assert dispatch.use_triton(feat) is False
    assert torch.equal(K.gradcam(feat, grad), K.gradcam_torch(feat, grad))


def test_mode_is_read_at_call_time(monkeypatch):
    x = torch.randn(1, 2, 2, 2)
    monkeypatch.setenv("LCR_KERNELS", "torch")
    assert dispatch.use_triton(x) is False
    monkeypatch.setenv("LCR_KERNELS", "triton")
    assert dispatch.use_triton(x) is (dispatch.HAS_TRITON and (x.is_cuda or dispatch.INTERPRETED))


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("LCR_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(torch.ones(2))


def test_auto_without_triton_uses_torch(monkeypatch):
    monkeypatch.setenv("LCR_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    assert dispatch.use_triton(torch.ones(2)) is False
    monkeypatch.setenv("LCR_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        dispatch.use_triton(torch.ones(2))
