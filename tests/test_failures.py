"""Failures end in a clear message and leave the last checkpoint as it was."""
import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from lcr_fast.checkpoint import CheckpointWriteError, save_training_checkpoint
from lcr_fast.config import ConfigError, load_config

from helpers import config_file, metrics, run_train, wait_for_logged, write_folder


# A learning rate whose first update overflows the weights: the next step's loss is NaN. (A NaN rate itself
# is refused by the config's checks.)
OVERFLOWING_LR = "train.base_lr=1e38"

def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=6, size=36)  # 3 steps per epoch
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 1, "knn_monitor": False, "num_epochs": 4})
    first = run_train(tmp_path, "run", cfg_path)
    assert first.returncode == 0, first.stdout + first.stderr
    last = tmp_path / "run" / "ckpt" / "last.pt"
    before = _digest(last)

    # A NaN learning rate turns every weight into NaN at the first resumed step; the next loss is NaN.
    proc = run_train(tmp_path, "run", cfg_path, "--resume", "train.stop_at_epoch=2", OVERFLOWING_LR)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: non-finite loss at optimizer step 5 (loss nan, ssl_loss nan, rationale_loss nan)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _digest(last) == before, "the last good checkpoint is untouched"
    assert max(m["step"] for m in metrics(tmp_path / "run")) == 4, "nothing is logged past the first bad step"


@pytest.mark.slow
def test_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the checkpoint folder should be")
    bad = run_train(tmp_path, "bad", config_file(tmp_path), "--ckpt_dir", blocker / "ckpt")
    assert bad.returncode == 2
    assert f"error: cannot write checkpoints to '{blocker / 'ckpt'}'" in bad.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists(), "no training step ran"


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_at_a_step_and_resume_continues_exactly(tmp_path, uninterrupted, signum):
    data, cfg_path, expected = uninterrupted

    proc = run_train(tmp_path, "pre", cfg_path, data=data, wait=False)
    wait_for_logged(proc, tmp_path / "pre", lambda m: m["step"] >= 3)
    proc.send_signal(getattr(signal, signum))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "stopped on a signal after optimizer step" in output
    stopped_at = max(m["step"] for m in metrics(tmp_path / "pre"))
    assert 3 <= stopped_at < 24

    resumed = run_train(tmp_path, "pre", cfg_path, "--resume", data=data)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = [m for m in metrics(tmp_path / "pre") if "loss" in m and m["step"] > stopped_at]
    assert after[0]["step"] == stopped_at + 1 and after[-1]["step"] == 24
    for m in after:
        assert m["loss"] == expected[m["step"]], m["step"]


WRITER = """
import sys, torch
from lcr_fast.checkpoint import atomic_save
n = 0
while True:
    n += 1
    atomic_save({"n": n, "weights": torch.full((4_000_000,), float(n))}, sys.argv[1])
    print(n, flush=True)
"""


@pytest.mark.slow
def test_killing_a_writer_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one complete checkpoint exists
        time.sleep(rng.uniform(0.0, 0.3))  # then die somewhere inside a later write
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        saved = torch.load(path, weights_only=True)
        assert saved["n"] >= 1 and torch.equal(saved["weights"], torch.full((4_000_000,), float(saved["n"])))


@pytest.mark.slow
def test_skip_mode_leaves_out_non_finite_steps_and_counts_them(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=6, size=36)  # 3 steps per epoch
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 1, "knn_monitor": False},
                           engine={"on_nonfinite": "skip"})
    # The first step runs at a NaN rate, so every later loss is NaN: those steps are skipped, not fatal.
    proc = run_train(tmp_path, "run", cfg_path, OVERFLOWING_LR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped 2 step(s) with a non-finite loss" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_steps"] == 2 and results["steps"] == 1


def test_yaml_that_would_build_python_objects_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="is not plain YAML"):
        load_config(evil)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_checkpoint_folder_lock_live_holder_and_stale_lock(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 1, "knn_monitor": False})
    lock = tmp_path / "run" / "ckpt" / ".lcr-fast.lock"
    lock.parent.mkdir(parents=True)

    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # a live run holds the folder
    busy = run_train(tmp_path, "run", cfg_path)
    assert busy.returncode == 2
    assert f"is in use by another run (process {os.getpid()} on {socket.gethostname()})" in busy.stderr

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{gone.pid} {socket.gethostname()}")  # left by a run killed with -9
    proc = run_train(tmp_path, "run", cfg_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"removing a stale lock {lock} left by process {gone.pid}" in proc.stderr
    assert not lock.exists(), "released at the end of the run"


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "last.pt"
    save_training_checkpoint(path, model, optimizer, 1, 4, {"name": "x"})
    before = _digest(path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"the first bytes fit")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    intact = "No space left on device; the previous checkpoint there, if any, is intact"
    with pytest.raises(CheckpointWriteError, match=intact):
        save_training_checkpoint(path, model, optimizer, 2, 8, {"name": "x"})
    assert _digest(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file is left behind"
