"""Distributed faults end the run with an error instead of a hang."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, write_folder
from test_train_cli import _config_file, _wait_for_logged

LAUNCHER = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def test_port_in_use_is_a_clear_error(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, str(REPO / "lcr_fast" / "train.py"), "-c", str(_config_file(tmp_path)),
                               "--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "l"), "--ckpt_dir", str(tmp_path / "c")],
                              capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert f"error: cannot form the process group at 127.0.0.1:{port}" in proc.stderr
    assert "address already in use" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not os.path.exists(LAUNCHER), reason="deepspeed launcher not installed")
def test_a_dead_rank_ends_the_other_within_a_minute(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=40, size=36)  # 10 steps per epoch on 2 ranks
    cfg = _config_file(tmp_path, train={"stop_at_epoch": 3, "num_epochs": 3, "knn_monitor": False})
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.Popen([LAUNCHER, "--num_gpus", "2", "--master_port", "29623", str(REPO / "lcr_fast" / "train.py"),
                             "-c", str(cfg), "--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "run"),
                             "--ckpt_dir", str(tmp_path / "run" / "ckpt"), "--hide_progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        _wait_for_logged(proc, tmp_path / "run", lambda m: m["step"] >= 2)
        ranks = subprocess.run(["pgrep", "-f", f"local_rank=1 -c {cfg}"], capture_output=True, text=True).stdout.split()
        assert ranks, "rank 1 not found"
        os.kill(int(ranks[0]), signal.SIGKILL)
        killed_at = time.time()
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0, output[-2000:]
        assert time.time() - killed_at < 60
        assert not subprocess.run(["pgrep", "-f", f"train.py.* -c {cfg}"], capture_output=True, text=True).stdout.split(), "a rank is still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
