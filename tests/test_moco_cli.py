"""MoCo v2 + LCR through the entry point: one process and two gloo ranks under the deepspeed launcher."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, tiny_config, write_folder


def _moco_config(tmp_path, **train):
    cfg = tiny_config(
        model={"name": "moco", "moco_dim": 16, "moco_k": 16, "moco_m": 0.99},
        train={"optimizer": {"name": "sgd", "weight_decay": 1e-4, "momentum": 0.9}, "schedule": "cosine_epoch",
               "scale_lr": False, "warmup_epochs": 0, "base_lr": 0.03, "knn_monitor": False, "retrieval_interval": 1, **train},
        data={"recipe": "mocov2"},
    )
    path = tmp_path / "moco.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _cmd(launcher, cfg, tmp_path, name):
    return launcher + [str(REPO / "lcr_fast" / "train.py"), "-c", str(cfg), "--data_dir", str(tmp_path / "data"),
                       "--log_dir", str(tmp_path / name), "--ckpt_dir", str(tmp_path / name / "ckpt"), "--hide_progress"]


def test_moco_single_process_reports_last_and_best_retrieval(tmp_path):
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    proc = subprocess.run(_cmd([sys.executable], _moco_config(tmp_path), tmp_path, "one"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank-1" in proc.stdout and "best over epochs" in proc.stdout
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [0, 1] and all("mAP" in h for h in results["history"])
    best = results["retrieval_best"]["mAP"]
    assert best["value"] == max(h["mAP"] for h in results["history"])
    assert "Best epoch" in (tmp_path / "one" / "report.md").read_text()


def test_moco_queue_size_must_divide_into_global_batches(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    cfg = _moco_config(tmp_path, batch_size=6)
    proc = subprocess.run(_cmd([sys.executable], cfg, tmp_path, "bad"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "model.moco_k=16 is not a multiple of the global batch train.batch_size=6" in proc.stderr
    assert "12, 18, 24" in proc.stderr


@pytest.mark.skipif(shutil.which("deepspeed", path=os.path.dirname(sys.executable)) is None, reason="deepspeed launcher not installed")
def test_moco_two_ranks_under_the_deepspeed_launcher(tmp_path):
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", "29611"]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(_cmd(launcher, _moco_config(tmp_path), tmp_path, "two"), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("rank-1") == 2, "rank 0 alone prints the results (rationale and GAP lines)"
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["steps"] == 6 and 0.0 <= results["retrieval"]["mAP"] <= 1.0
