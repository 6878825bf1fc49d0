"""Kernel dispatch: the process's KernelBackend holds the mode (a using block over LCR_KERNELS, read at
each call, over kernels.backend), validated; auto keeps CPU tensors on the torch reference."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import lcr_fast.kernels as K
from lcr_fast.kernels import dispatch

gradcam_module = importlib.import_module("lcr_fast.kernels.gradcam")  # the package re-exports the function


def test_bad_value_names_the_valid_ones():
    before = dispatch.BACKEND.mode
    with pytest.raises(ValueError, match=r"LCR_KERNELS='cuda' is not valid; use one of auto, triton, torch"):
        dispatch.requested_mode("auto", {"LCR_KERNELS": "cuda"})
    with pytest.raises(ValueError, match=r"kernels.backend='cuda' is not valid; use one of auto, triton, torch"):
        dispatch.requested_mode("cuda", {})
    with pytest.raises(ValueError, match="auto, triton, torch"):
        dispatch.BACKEND.select("cuda")
    assert dispatch.BACKEND.mode == before  # a refused mode leaves the backend as it was


def test_the_environment_variable_overrides_the_config():
    assert dispatch.requested_mode("triton", {}) == "triton"
    assert dispatch.requested_mode("triton", {"LCR_KERNELS": " Torch "}) == "torch"
    assert dispatch.requested_mode("torch", {"LCR_KERNELS": ""}) == "torch"  # set but empty: not an override


def test_auto_uses_torch_for_cpu_tensors(monkeypatch):
    def refuse(*args):
        raise AssertionError("auto launched Triton on a CPU tensor")

    monkeypatch.setattr(gradcam_module.GradCAMFunction, "apply", refuse)
    feat, grad = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    with dispatch.BACKEND.using("auto"):
        assert dispatch.use_triton(feat) is False
        assert torch.equal(K.gradcam(feat, grad), K.gradcam_torch(feat, grad))


def test_the_environment_variable_switches_between_calls_over_the_selected_mode(monkeypatch):
    environ: dict[str, str] = {}
    backend = dispatch.KernelBackend("triton", environ=environ)
    assert backend.mode == "triton"
    environ["LCR_KERNELS"] = "torch"
    assert backend.mode == "torch" and backend.use_triton(torch.ones(2)) is False
    environ["LCR_KERNELS"] = "auto"
    assert backend.mode == "auto" and backend.use_triton(torch.ones(2)) is False
    environ["LCR_KERNELS"] = "cuda"
    with pytest.raises(ValueError, match="LCR_KERNELS='cuda' is not valid"):
        backend.use_triton(torch.ones(2))
    del environ["LCR_KERNELS"]
    backend.select("torch")
    assert backend.mode == "torch"
    monkeypatch.setenv("LCR_KERNELS", "torch")  # the process's backend reads the real environment
    assert dispatch.kernel_mode() == "torch"


def test_the_mode_is_the_backends_and_using_restores_it(monkeypatch):
    x = torch.randn(1, 2, 2, 2)
    before = dispatch.BACKEND.mode
    with dispatch.BACKEND.using("torch"):
        assert dispatch.kernel_mode() == "torch" and dispatch.use_triton(x) is False
        monkeypatch.setenv("LCR_KERNELS", "triton")  # a using block wins over the variable
        assert dispatch.use_triton(x) is False
        with dispatch.BACKEND.using("triton"):
            dispatch.BACKEND.disable("gradcam", "failed its check")
            assert dispatch.use_triton(x) is (dispatch.HAS_TRITON and (x.is_cuda or dispatch.INTERPRETED))
            assert dispatch.use_triton(x, op="gradcam") is False
        assert dispatch.BACKEND.mode == "torch" and dispatch.BACKEND.disabled() == {}
    monkeypatch.delenv("LCR_KERNELS")
    assert dispatch.BACKEND.mode == before


def test_a_selection_inside_a_using_block_is_undone_after_it():
    backend = dispatch.KernelBackend("auto", environ={})
    with backend.using():
        backend.select("torch")
        backend.disable("gradcam", "failed its check")
        assert backend.mode == "torch"
    assert backend.mode == "auto" and backend.disabled() == {}


def test_a_fresh_process_takes_the_environment_variable():
    code = "import lcr_fast.kernels as K; print(K.BACKEND.mode, K.kernel_mode())"
    env = {**{k: v for k, v in os.environ.items() if k != "LCR_KERNELS"}, "LCR_KERNELS": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["torch", "torch"]


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with dispatch.BACKEND.using("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(torch.ones(2))


def test_auto_without_triton_uses_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with dispatch.BACKEND.using("auto"):
        assert dispatch.use_triton(torch.ones(2)) is False
    with dispatch.BACKEND.using("triton"), pytest.raises(RuntimeError, match="cannot be imported"):
        dispatch.use_triton(torch.ones(2))
