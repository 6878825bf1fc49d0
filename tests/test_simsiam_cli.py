"""SimSiam + LCR through the entry points: two gloo ranks under the deepspeed launcher, a resume on one process,
the end-of-run evaluation and lcr-eval on its checkpoint."""
import json
import os

import pytest

from lcr_fast.eval.cli import evaluate_checkpoint, parse_args

from helpers import config_file, metrics, needs_launcher, run_train, write_folder

pytestmark = pytest.mark.slow


def _losses(run_dir):
    return {m["step"]: (m["ssl_loss"], m["rationale_loss"]) for m in metrics(run_dir) if "ssl_loss" in m}


@needs_launcher
def test_simsiam_trains_on_two_ranks_resumes_on_one_and_evaluates(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=8, size=40)  # 2 steps of 8 per epoch
    cfg_path = config_file(
        tmp_path,
        model={"name": "simsiam", "simsiam_dim": 32, "simsiam_pred_dim": 8},  # no max-pool: layer4 2 x 2 at 32 px
        train={"optimizer": {"name": "sgd", "weight_decay": 1e-4, "momentum": 0.9}, "schedule": "cosine_epoch",
               "scale_lr": True, "warmup_epochs": 0, "base_lr": 1.0, "batch_size": 8, "num_epochs": 3,
               "stop_at_epoch": 2, "knn_monitor": False, "retrieval_interval": 1},
        logger={"tensorboard": False},
    )
    # One run sequence, since each command line costs tens of seconds here: two ranks train the first epoch,
    # one process accumulating the same two micro-batches of 4 resumes for the second, then evaluates.
    # (That two ranks equal one accumulating is the engine's, whatever the method: tests/test_engine_scale.py.)
    two = run_train(tmp_path, "run", cfg_path, "train.stop_at_epoch=1", "logger.matplotlib=false", ranks=2)
    assert two.returncode == 0, two.stdout[-4000:] + two.stderr[-4000:]
    assert two.stdout.count("report written to") == 1, "rank 0 alone reports"
    resumed = run_train(tmp_path, "run", cfg_path, "--resume", "engine.grad_accum_steps=2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "epoch 1, step 2" in resumed.stdout

    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4], "steps 1-2 on two ranks, 3-4 resumed"
    assert all(ssl == ssl and -1.0 <= ssl <= 1.0 and kl > 0 for ssl, kl in losses.values())

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 4 and [h["epoch"] for h in results["history"]] == [0, 1]
    assert 0.0 <= results["retrieval"]["mAP"] <= 1.0 and "heatmaps" in results
    assert results["linear_eval"]["skipped"].startswith("SimSiam's main_simsiam.py runs no linear evaluation")
    assert "reference_checkpoint" not in results, "SimSiam has no reference layout to export"
    assert os.listdir(tmp_path / "run" / "ckpt") == ["last.pt"]

    evaluated = evaluate_checkpoint(parse_args([
        "--ckpt", str(tmp_path / "run" / "ckpt" / "last.pt"), "--data_dir", str(tmp_path / "data"), "--epochs", "2",
        "--out", str(tmp_path / "eval"), "--hide_progress"]))
    assert evaluated["method"] == "simsiam" and evaluated["linear"]["protocol"] == "cached"
    assert evaluated["retrieval"]["mAP"] == pytest.approx(results["retrieval"]["mAP"])
    assert 0.0 <= evaluated["linear"]["top1"] <= 100.0 and 0.0 <= evaluated["knn"]["top1"] <= 100.0
