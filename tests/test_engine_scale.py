"""The engine across ranks, micro-batches, precisions and ZeRO stages, through the real CLI on tiny data.

Per-rank BatchNorm (the default, as the reference's DataParallel) normalises each rank's batch by its
own statistics, so N ranks over a global batch are not one process over that batch. They are exactly
one process accumulating N micro-batches of the same size, which reads the same images with the same
augmentations, takes the same BN statistics per micro-batch and sums the same gradients; that is
the equality tested here, next to the direction of the BN difference: the losses move away from the
single large batch's.
"""
import os
import shutil

import pytest
import torch

from lcr_fast import engine as eng
from lcr_fast.config import ConfigError, load_config
from lcr_fast.objective import global_batch_losses

from helpers import config_file, metrics, needs_launcher, run_train, tiny_config, write_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    write_folder(root / "data", classes=3, per_class=8, size=40)
    path = config_file(root, train={"batch_size": 8, "stop_at_epoch": 2, "num_epochs": 3},
                       logger={"tensorboard": False, "matplotlib": False})
    yield root, path
    shutil.rmtree(root, ignore_errors=True)  # about 2 GB of checkpoints and ZeRO states


def _run(root, cfg_path, name, *overrides, ranks=None, resume=False):
    proc = run_train(root, name, cfg_path, *(["--resume"] if resume else []), *overrides, ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(root, name):
    return {m["step"]: (m["ssl_loss"], m["rationale_loss"]) for m in metrics(root / name) if "ssl_loss" in m}


@pytest.mark.slow
@needs_launcher
def test_two_ranks_equal_one_rank_accumulating_and_differ_from_one_big_batch(setup):
    root, cfg_path = setup
    two = _run(root, cfg_path, "two", ranks=2)
    assert two.stdout.count("report written to") == 1, "rank 0 alone writes the report"
    checkpoints = sorted(os.listdir(root / "two" / "ckpt"))
    assert checkpoints == ["last.pt", "lcr-experiment_reference.pth"], "one checkpoint set"
    _run(root, cfg_path, "accum", "engine.grad_accum_steps=2")
    _run(root, cfg_path, "whole")
    two_l, accum_l, whole_l = _losses(root, "two"), _losses(root, "accum"), _losses(root, "whole")
    assert sorted(two_l) == sorted(accum_l) == sorted(whole_l) == list(range(1, 7))
    for step in two_l:  # every step, not only the first: the parameters stay equal too
        assert two_l[step] == pytest.approx(accum_l[step], rel=1e-6, abs=1e-7)
    # Batch statistics over 4 samples instead of 8: already the first step's losses differ, far beyond
    # float noise, and the two-rank run sits with the accumulating run, not with the big batch.
    (ssl2, kl2), (ssl1, kl1) = two_l[1], whole_l[1]
    assert abs(ssl2 - ssl1) > 1e-4 and abs(kl2 - kl1) > 1e-3
    assert abs(ssl2 - accum_l[1][0]) < 1e-3 * abs(ssl2 - ssl1)


@pytest.mark.slow
@needs_launcher
def test_a_two_rank_checkpoint_resumes_on_one_rank(setup):
    """Same global batch: 1 rank accumulating 2 micro-batches continues the 2-rank run exactly."""
    root, cfg_path = setup
    if not (root / "two").exists():
        _run(root, cfg_path, "two", ranks=2)
    _run(root, cfg_path, "first", "train.stop_at_epoch=1", ranks=2)
    _run(root, cfg_path, "first", "engine.grad_accum_steps=2", resume=True)
    resumed, straight = _losses(root, "first"), _losses(root, "two")
    assert sorted(resumed) == list(range(1, 7))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)


@pytest.mark.slow
# bf16 is left out: its checkpoints hold what fp32's do (fp32 master weights, no loss scale), its CLI run is
# test_train_cli's test_a_bf16_run_and_lcr_eval_on_its_checkpoint_give_the_same_figures, and where the CPU computes
# bf16 natively every resume test of the suite runs in it (auto); where it does not, a second emulated bf16 run cost
# 35 s of the suite.
@pytest.mark.parametrize("overrides", [
    ["engine.precision=fp16"],
    ["engine.zero_stage=1", "train.optimizer.name=sgd"],
    ["engine.zero_stage=2", "train.optimizer.name=adamw"],
])
def test_precisions_and_zero_stages_train_and_resume(setup, overrides):
    root, cfg_path = setup
    name = "_".join(o.replace("=", "-") for o in overrides)
    _run(root, cfg_path, name, "train.stop_at_epoch=1", *overrides)
    first = _losses(root, name)
    assert sorted(first) == [1, 2, 3]
    assert all(abs(x) < 10 for values in first.values() for x in values), first
    zero = any("zero_stage" in o for o in overrides)
    if zero:
        # The engine writes ZeRO's optimizer partitions under the step's tag, which last.pt names.
        assert sorted(p.name for p in (root / name / "ckpt").glob(eng.ZERO_TAG + "*")) == [eng.ZERO_TAG + "3"]
    _run(root, cfg_path, name, "train.stop_at_epoch=2", *overrides, resume=True)
    assert sorted(_losses(root, name)) == list(range(1, 7))
    if zero:  # the first epoch's partitions went once the second epoch's last.pt named its own
        assert sorted(p.name for p in (root / name / "ckpt").glob(eng.ZERO_TAG + "*")) == [eng.ZERO_TAG + "6"]


def test_logged_losses_report_the_global_batch():
    # Two ranks x two micro-batches: the SSL loss is their mean, the KL the sum over all four pieces.
    losses = global_batch_losses(torch.tensor([0.5, 2.0]), 0.01, 4)
    assert losses == pytest.approx({"loss": 0.5 + 0.01 * 8.0, "ssl_loss": 0.5, "rationale_loss": 8.0})


@pytest.mark.parametrize("overrides, message", [
    (["engine.zero_stage=1"], "hands LARS one flattened partition"),
    (["engine.zero_stage=2", "train.optimizer.name=lars_simclr"], "use zero_stage 0 with lars_simclr"),
    (["engine.zero_stage=3", "train.optimizer.name=sgd"], "breaks GradCAM's autograd.grad"),
    (["engine.sync_bn=true"], "engine.sync_bn needs CUDA"),
])
def test_combinations_that_would_compute_something_else_fail_clearly(overrides, message):
    # Config-only combinations fail when the config is loaded; sync_bn needs the device to be known.
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, overrides)
        eng.check_device_options(cfg, torch.device("cpu"))


def test_batch_must_divide_into_ranks_and_micro_batches():
    with pytest.raises(ConfigError, match="train.batch_size 6 is not divisible by engine.grad_accum_steps 4"):
        tiny_config(train={"batch_size": 6}, engine={"grad_accum_steps": 4})
    with pytest.raises(ConfigError, match="not divisible by 3 rank\\(s\\) x 2 accumulated"):
        eng.micro_batch_size(tiny_config(train={"batch_size": 8}, engine={"grad_accum_steps": 2}), 3)
    assert eng.micro_batch_size(tiny_config(train={"batch_size": 8}, engine={"grad_accum_steps": 2}), 2) == 2


def test_accumulation_refuses_skipping_single_batches():
    with pytest.raises(ConfigError, match="on_nonfinite=skip drops single batches"):
        tiny_config(engine={"grad_accum_steps": 2, "on_nonfinite": "skip"})


def test_fp16_and_bf16_become_torch_autocast_with_fp32_gradient_reduction():
    cfg = tiny_config()
    for precision, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        ds = eng.deepspeed_config(cfg, 1, precision)
        assert ds["torch_autocast"] == {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
    assert "torch_autocast" not in eng.deepspeed_config(cfg, 1, "fp32")
    assert "fp16" not in eng.deepspeed_config(cfg, 1, "fp16"), "DeepSpeed's own fp16 would cast the model to half"


@pytest.mark.slow
def test_compiled_trunks_give_the_eager_step_and_keep_checkpoint_keys(fresh_dynamo):
    from lcr_fast.models import build_model, compile_backbones

    cfg = tiny_config()
    torch.manual_seed(0)
    eager, compiled = build_model(cfg), build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    compile_backbones(compiled, "aot_eager")  # tracing and AOT autograd, without code generation
    assert list(compiled.state_dict()) == keys
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    outs = []
    for model in (eager, compiled):
        out = model(x1, x2)
        out["loss"].backward()
        outs.append((out, [p.grad.clone() for p in model.backbone.parameters()]))
    for key in ("ssl_loss", "rationale_loss"):
        torch.testing.assert_close(outs[1][0][key], outs[0][0][key], rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_backbones(compiled, "fast")
