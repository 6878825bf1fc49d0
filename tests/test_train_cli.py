"""The training entry point end to end on tiny data: results, checkpoints, resume after kill -9, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lcr_fast import train
from lcr_fast.checkpoint import load_training_checkpoint
from lcr_fast.compat import load_reference_checkpoint
from lcr_fast.config import ConfigError
from lcr_fast.data import DatasetError

from helpers import REPO, tiny_config, write_folder




def _config_file(tmp_path, **sections):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**sections).to_dict()))
    return path


def _run(tmp_path, name, cfg_path, *extra, data=None, wait=True):
    cmd = [sys.executable, str(REPO / "lcr_fast" / "train.py"), "-c", str(cfg_path), "--data_dir", str(data or tmp_path / "data"),
           "--log_dir", str(tmp_path / name), "--ckpt_dir", str(tmp_path / name / "ckpt"), "--hide_progress", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_logged(proc, run_dir, predicate, timeout=300):
    """Wait until the running ``proc`` has logged a metrics line matching ``predicate``; fail if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(predicate(m) for m in _metrics(run_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the awaited step was logged"


def test_train_writes_results_and_checkpoints_that_reload(tmp_path):
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    cfg_path = _config_file(tmp_path, train={"stop_at_epoch": 2, "knn_interval": 1}, seed=None)
    proc = _run(tmp_path, "run", cfg_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank-1" in proc.stdout and "mAP" in proc.stdout and "kNN top-1" in proc.stdout

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("rank1", "rank5", "mAP"):
        assert 0.0 <= results["retrieval"][key] <= 1.0
    assert [h["epoch"] for h in results["history"]] == [0, 1] and results["steps"] == 6

    ckpt = load_training_checkpoint(tmp_path / "run" / "ckpt" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6
    assert isinstance(ckpt["config"]["seed"], int), "the seed that was drawn is recorded"
    assert ckpt["config"]["model"]["backbone"] == "resnet18"
    lines = _metrics(tmp_path / "run")
    assert {"loss", "ssl_loss", "rationale_loss", "lr", "pairs_per_s"} <= set(lines[0])
    assert (tmp_path / "run" / "tensorboard").is_dir()

    exported = load_reference_checkpoint(tmp_path / "run" / "ckpt" / f"{ckpt['config']['name']}_reference.pth", "byol",
                                         config=tiny_config(model={"pretrained": "none"}))
    assert torch.equal(exported.backbone.conv1.weight, ckpt["model"]["backbone.conv1.weight"])

    # --eval_from on our checkpoint and on the reference export give the same figures as the run.
    for source in ("last.pt", f"{ckpt['config']['name']}_reference.pth"):
        again = _run(tmp_path, "eval_" + source.split(".")[0], cfg_path, "--eval_from", str(tmp_path / "run" / "ckpt" / source))
        assert again.returncode == 0, again.stdout + again.stderr
        evaluated = json.loads((tmp_path / ("eval_" + source.split(".")[0]) / "results.json").read_text())
        assert evaluated["retrieval"] == pytest.approx(results["retrieval"])
        assert evaluated["knn_top1"] == pytest.approx(results["knn_top1"])


def _uninterrupted_losses(tmp_path):
    """Data for two epochs of 12 steps, its config, and the loss of every step of an uninterrupted run."""
    write_folder(tmp_path / "data", classes=2, per_class=24, size=36)  # 12 steps per epoch
    cfg_path = _config_file(tmp_path, train={"stop_at_epoch": 2, "knn_monitor": False})
    full = _run(tmp_path, "full", cfg_path)
    assert full.returncode == 0, full.stdout + full.stderr
    expected = {m["step"]: m["loss"] for m in _metrics(tmp_path / "full") if "loss" in m}
    return cfg_path, expected


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    cfg_path, expected = _uninterrupted_losses(tmp_path)

    proc = _run(tmp_path, "killed", cfg_path, wait=False)
    _wait_for_logged(proc, tmp_path / "killed", lambda m: m.get("epoch") == 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(m["step"] for m in _metrics(tmp_path / "killed"))
    assert 12 < done < 24, "killed in the middle of the second epoch"

    resumed = _run(tmp_path, "killed", cfg_path, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "epoch 1, step 12" in resumed.stdout
    after = [m for m in _metrics(tmp_path / "killed") if "loss" in m][-12:]
    assert after[0]["step"] == 13
    for m in after:
        assert m["loss"] == pytest.approx(expected[m["step"]], rel=1e-6, abs=1e-7), m["step"]


def _forbid_model(monkeypatch):
    def fail(*_):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(train, "build_model", fail)


def test_missing_data_dir_fails_before_any_model(tmp_path, monkeypatch):
    _forbid_model(monkeypatch)
    cfg_path = _config_file(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        train.main(["-c", str(cfg_path), "--data_dir", str(tmp_path / "missing"), "--log_dir", str(tmp_path / "l"), "--ckpt_dir", str(tmp_path / "c")])


def test_empty_class_folder_fails_before_any_model(tmp_path, monkeypatch):
    _forbid_model(monkeypatch)
    write_folder(tmp_path / "data", classes=2, per_class=2)
    (tmp_path / "data" / "train" / "class_empty").mkdir()
    with pytest.raises(DatasetError, match="class_empty"):
        train.main(["-c", str(_config_file(tmp_path)), "--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "l"),
                    "--ckpt_dir", str(tmp_path / "c")])


def test_misspelt_key_is_a_one_line_error_from_the_cli(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbon: resnet18\n")
    proc = _run(tmp_path, "bad", bad)
    assert proc.returncode == 2
    assert "error: unknown config key 'model.backbon'" in proc.stderr and "did you mean 'model.backbone'" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(ConfigError):
        train.main(["-c", str(bad), "--data_dir", str(tmp_path / "data"), "--log_dir", "l", "--ckpt_dir", "c"])


def test_debug_run_on_the_default_dali_backend(tmp_path):
    """--debug (batch 2, one epoch, 8 images, no worker processes) through DALI, the default backend."""
    write_folder(tmp_path / "data", classes=2, per_class=5, size=40)
    cfg_path = _config_file(tmp_path, data={"backend": "dali"})
    proc = _run(tmp_path, "debug", cfg_path, "--debug")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "debug" / "results.json").read_text())
    assert results["steps"] == 4 and results["config"]["data"]["backend"] == "dali"
    assert results["config"]["train"]["batch_size"] == 2
