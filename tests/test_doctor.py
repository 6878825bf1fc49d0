"""lcr-doctor: its JSON, its table and its exit status, which is 0 only when every required check passes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lcr_fast import doctor
from lcr_fast import engine as eng

from helpers import REPO

CHECKS = ("torch", "deepspeed", "nccl", "kernels", "data", "step")


@pytest.fixture
def cheap_checks(monkeypatch):
    """The three slow checks replaced by passing ones: what is tested here is the verdict and the output."""
    for name in ("kernels", "data", "step"):
        monkeypatch.setattr(doctor, f"check_{name}", lambda *args, name=name: doctor.Check(name, "ok", "fine", True))


def test_json_holds_versions_gpus_and_every_check(cheap_checks, capsys):
    assert doctor.main(["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"ok", "versions", "gpus", "checks"} and result["ok"] is True
    assert {"python", "torch", "torch_cuda", "triton", "dali", "deepspeed", "numba", "torchvision"} <= set(
        result["versions"])
    assert tuple(result["checks"]) == CHECKS
    assert result["checks"]["deepspeed"]["status"] == "ok" and result["checks"]["deepspeed"]["required"] is True
    assert result["checks"]["nccl"] == {"status": "skipped", "detail": "no GPU: the CPU process group uses gloo",
                                        "required": False, "data": {}}
    assert result["gpus"] == []


def test_a_required_check_that_fails_makes_the_exit_status_one(cheap_checks, monkeypatch, tmp_path, capsys):
    def broken():
        raise RuntimeError("DALI could not build its pipeline")

    monkeypatch.setattr(doctor, "check_data", broken)
    path = tmp_path / "doctor.json"
    assert doctor.main(["--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "  data       fail      yes       RuntimeError: DALI could not build its pipeline" in out
    assert out.rstrip().endswith("a required component FAILED")
    result = json.loads(path.read_text())
    assert result["ok"] is False and result["checks"]["data"]["status"] == "fail"


def test_a_fallback_passes_and_an_optional_failure_does_not_count(cheap_checks, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "check_kernels", lambda full: doctor.Check("kernels", "fallback", "torch", True))
    monkeypatch.setattr(doctor, "check_nccl", lambda: doctor.Check("nccl", "fail", "no NCCL", False))
    assert doctor.main([]) == 0
    assert capsys.readouterr().out.rstrip().endswith("every required component works")


def test_noise_written_to_stdout_by_a_check_goes_to_stderr(cheap_checks, monkeypatch, capfd):
    """DeepSpeed logs to stdout, DALI's C++ prints there: the JSON on stdout must stay parseable."""
    def noisy():
        print("[WARNING] Setting accelerator to CPU")
        return doctor.Check("deepspeed", "ok", "deepspeed x", True)

    monkeypatch.setattr(doctor, "check_deepspeed", noisy)
    assert doctor.main(["--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["checks"]["deepspeed"]["detail"] == "deepspeed x"
    assert "Setting accelerator to CPU" in err


@pytest.mark.slow
def test_the_real_report_on_this_machine(tmp_path):
    """Every check for real, as a user runs it: the kernels compile ahead of time, DALI's CPU backend and
    torchvision read synthetic JPEGs, 20 steps of the trainer's own step run (about a minute or two)."""
    path = tmp_path / "doctor.json"
    # As a user starts it: not inside a process group that an in-process test of this session formed.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "lcr_fast.doctor", "--json", str(path)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(path.read_text())
    checks = result["checks"]
    assert result["ok"] is True and tuple(checks) == CHECKS
    assert checks["kernels"]["status"] == "ok" and "compile for sm_80, sm_90" in checks["kernels"]["detail"]
    assert {"_gradcam_fwd_kernel", "_kl_fwd_kernel", "_byol_fwd_kernel"} <= set(checks["kernels"]["data"]["compiled"])
    assert checks["data"]["data"]["chosen"] == "dali-cpu"
    assert checks["data"]["data"]["paths"]["dali-cpu"] == checks["data"]["data"]["paths"]["torchvision"] == "ok"
    assert checks["data"]["data"]["paths"]["dali-mixed"].startswith("skipped: no GPU; its graph defines")
    step = checks["step"]["data"]
    auto = "bf16" if eng.native_bf16(torch.device("cpu")) else "fp32"  # what engine.precision=auto picks here
    assert step["arch"] == "resnet18" and step["pairs_per_s"] > 0 and step["precision"] == auto
    assert "every required component works" in proc.stdout
