"""The benchmarks measure what users get: the step benchmark's defaults are the trainer's, each side
says what it ran, and the fraction of the machine's peak comes from a probe and a FLOP count that
are themselves right."""
import json
import re
import subprocess
import sys

import pytest
import torch

from lcr_fast import engine as eng

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import peak  # noqa: E402


def test_the_flop_count_of_a_known_computation():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    conv = torch.nn.Conv2d(2, 4, 3, bias=False)
    x = torch.randn(1, 2, 6, 6)
    assert peak.step_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    # a 3x3 convolution on a 4x4 output: 4 output channels x 16 positions x 2 x 9 x 2 multiply-adds
    assert peak.step_flops(lambda: conv(x)) == 4 * 16 * 2 * 9 * 2


def test_the_matmul_probe_reports_a_rate_at_a_size_it_names():
    result = peak.matmul_peak(torch.float32, torch.device("cpu"), budget_s=0.2)
    assert result["dtype"] == "float32" and 256 <= result["n"] <= peak.LARGEST
    assert result["gflops"] > 0.1


@pytest.mark.slow
def test_the_step_benchmark_runs_the_trainer_defaults_and_the_same_work_on_both_sides(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_bench.py"), "--arch", "resnet18",
                           "--size", "32", "--batch", "2", "--steps", "1", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    auto = eng.choose_precision("auto", torch.device("cpu"))
    assert (results["ours"]["precision"], results["ours"]["precision_reason"]) == (auto.precision, auto.reason)
    assert results["ours"]["layout"] == "channels_last" and results["reference"]["layout"] == "contiguous"
    assert results["config"]["precision"] == "auto" and results["config"]["compile"] == "none"
    ours, ref = results["ours"]["gflop_per_step"], results["reference"]["gflop_per_step"]
    assert ours > 0 and abs(ours - ref) / ref < 0.02, "both sides compute the same step"
    for side in ("ours", "reference"):
        fraction = results[side]["peak_fraction"]
        assert 0 < fraction < 1.5
        assert f"= {100 * fraction:.0f}% of this machine's {results[side]['precision']} matmul peak" in proc.stdout
    assert results["speedup"] == pytest.approx(results["reference"]["s_per_step"] / results["ours"]["s_per_step"])
    # Each side says the compile mode that ran and, from a profiled step, the share outside the convolutions.
    assert results["ours"]["compile"] == "none" and results["reference"]["compile"].startswith("none")
    for side in ("ours", "reference"):
        share = results[side]["outside_conv_share"]
        assert 0 < share < 1 and results[side]["op_s_per_step"] > 0 and len(results[side]["top_ops"]) == 8
        assert f"{100 * share:.1f}% of it outside the convolutions" in proc.stdout


@pytest.mark.parametrize("script,ratio_lines", [("conv_bench.py", 2), ("views_bench.py", 2)])
def test_the_cpu_trunk_benchmarks_print_their_ratios(script, ratio_lines):
    """The two benchmarks behind the CPU trunk's choices (the weight gradients as matrix products, the views as
    one batch) run on a tiny trunk and print a positive ratio per comparison."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--arch", "resnet18", "--batch", "2",
                           "--size", "32", *(["--repeats", "1", "--trunk_rounds", "1"] if script == "conv_bench.py"
                                             else ["--rounds", "1"])],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratios = [float(m) for m in re.findall(r"(\d+\.\d+)x\)?$", proc.stdout, flags=re.M)]
    assert len(ratios) == ratio_lines and all(r > 0 for r in ratios), proc.stdout
