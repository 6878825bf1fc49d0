"""Distributed faults end the run with an error instead of a hang."""
import os
import signal
import socket
import subprocess
import time

import pytest

from helpers import config_file, needs_launcher, run_train, wait_for_logged, write_folder

pytestmark = pytest.mark.slow


def test_port_in_use_is_a_clear_error(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = run_train(tmp_path, "run", config_file(tmp_path), env=env, timeout=300)
    assert proc.returncode == 2
    assert f"error: cannot form the process group at 127.0.0.1:{port}" in proc.stderr
    assert "address already in use" in proc.stderr and "Traceback" not in proc.stderr


@needs_launcher
def test_a_dead_rank_ends_the_other_within_a_minute(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=40, size=36)  # 10 steps per epoch on 2 ranks
    cfg = config_file(tmp_path, train={"stop_at_epoch": 3, "num_epochs": 3, "knn_monitor": False})
    proc = run_train(tmp_path, "run", cfg, ranks=2, wait=False)
    try:
        wait_for_logged(proc, tmp_path / "run", lambda m: m["step"] >= 2)
        ranks = subprocess.run(["pgrep", "-f", f"local_rank=1 -c {cfg}"], capture_output=True, text=True).stdout.split()
        assert ranks, "rank 1 not found"
        os.kill(int(ranks[0]), signal.SIGKILL)
        killed_at = time.time()
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0, output[-2000:]
        assert time.time() - killed_at < 60
        still = subprocess.run(["pgrep", "-f", f"train.py.* -c {cfg}"], capture_output=True, text=True).stdout.split()
        assert not still, "a rank is still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
