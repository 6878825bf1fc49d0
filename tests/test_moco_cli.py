"""MoCo v2 + LCR through the entry point: one process and two gloo ranks under the deepspeed launcher."""
import json

import pytest

from helpers import config_file, needs_launcher, run_train, write_folder

pytestmark = pytest.mark.slow


def _moco_config(tmp_path):
    return config_file(
        tmp_path,
        model={"name": "moco", "moco_dim": 16, "moco_k": 16, "moco_m": 0.99},
        train={"optimizer": {"name": "sgd", "weight_decay": 1e-4, "momentum": 0.9}, "schedule": "cosine_epoch",
               "scale_lr": False, "warmup_epochs": 0, "base_lr": 0.03, "knn_monitor": False, "retrieval_interval": 1},
        data={"recipe": "mocov2"},
    )


def test_moco_single_process_reports_last_and_best_retrieval(tmp_path):
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    proc = run_train(tmp_path, "one", _moco_config(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank-1" in proc.stdout and "best over epochs" in proc.stdout
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [0, 1] and all("mAP" in h for h in results["history"])
    best = results["retrieval_best"]["mAP"]
    assert best["value"] == max(h["mAP"] for h in results["history"])
    assert "Best epoch" in (tmp_path / "one" / "report.md").read_text()


def test_moco_queue_size_must_divide_into_global_batches(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    # An override, because writing a config file with that batch already fails (tiny_config loads it).
    proc = run_train(tmp_path, "bad", _moco_config(tmp_path), "train.batch_size=6", timeout=300)
    assert proc.returncode == 2
    assert "model.moco_k=16 is not a multiple of the global batch train.batch_size=6" in proc.stderr
    assert "12, 18, 24" in proc.stderr


@needs_launcher
def test_moco_two_ranks_under_the_deepspeed_launcher(tmp_path):
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    proc = run_train(tmp_path, "two", _moco_config(tmp_path), ranks=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("retrieval (") == 2, "rank 0 alone prints the results (rationale and GAP lines)"
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["steps"] == 6 and 0.0 <= results["retrieval"]["mAP"] <= 1.0
