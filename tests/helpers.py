"""Small builders shared by the tests: tiny configs, models and JPEG folders, and the command lines they start."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lcr_fast.config import load_config
from lcr_fast.launch import LAUNCH_PREFIXES, LAUNCH_VARIABLES

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "lcr_fast" / "train.py"
LAUNCHER = Path(sys.executable).parent / "deepspeed"
needs_launcher = pytest.mark.skipif(not LAUNCHER.exists(), reason="deepspeed launcher not installed")


def tiny_config(**sections):
    """A ResNet-18, 32 px BYOL config with small heads: fast enough for CPU tests."""
    base = {
        "model": {"name": "byol", "backbone": "resnet18", "maxpool": False, "pretrained": "none",
                  "proj_hidden_dim": 64, "proj_dim": 32, "rationale_channels": 8},
        "dataset": {"image_size": 32, "num_workers": 0},
        "train": {"batch_size": 4, "num_epochs": 3, "stop_at_epoch": 2, "warmup_epochs": 1, "base_lr": 0.5, "knn_k": 5},
        # DALI's CPU pipelines take seconds to build; the DALI modules test that backend.
        "data": {"backend": "torchvision"},
        # Resumed runs must equal uninterrupted ones exactly, which needs deterministic kernels; logging
        # every step lets the tests compare the loss of each step, not every tenth.
        "engine": {"log_interval": 1, "deterministic": True},
        # Every BYOL run ends with the reference's linear evaluation: one epoch instead of the default 100.
        "eval": {"num_epochs": 1},
        "seed": 0,
    }
    for name, values in sections.items():
        base.setdefault(name, {})
        if isinstance(values, dict):
            base[name].update(values)
        else:
            base[name] = values
    return load_config(None, base)


def engine_order_step(model, optimizer, schedule, step: int, x1, x2) -> dict:
    """One optimizer step of ours in the engine's order (the schedule's rate, the EMA, forward, backward):
    what the per-step comparisons with a plain re-implementation run on our side."""
    schedule.apply(optimizer, step)
    model.momentum_update()
    out = model(x1, x2)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    return out


def assert_outputs_close(out: dict, expected: dict, step: int,
                         keys=("loss", "ssl_loss", "rationale_loss", "gradcam", "attention")) -> None:
    for key in keys:
        torch.testing.assert_close(out[key].detach(), expected[key], rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")


def write_folder(root: str | os.PathLike, classes: int = 3, per_class: int = 4, size: int = 40,
                 splits=("train", "test"), seed: int = 0) -> Path:
    """``root/<split>/class_<i>/<n>.jpg`` with random-texture images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                base = np.array([(60 * c) % 255, 120, (255 - 50 * c) % 255], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.jpg", quality=90)
    return root


def config_file(folder: Path, **sections) -> Path:
    """``folder/tiny.yaml``: :func:`tiny_config` with ``sections`` applied, for a command line's ``-c``."""
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**sections).to_dict()))
    return path


def launch_variable(name: str) -> bool:
    """Whether ``name`` is one of the variables lcr_fast.launch reads to place a process in its run."""
    return name in LAUNCH_VARIABLES or name.startswith(LAUNCH_PREFIXES)


def free_port() -> int:
    """A port no one listens on now: fixed ports collide with a second suite or a job on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(*argv, ranks: int | None = None, launcher: list | None = None, env: dict | None = None,
                wait: bool = True, timeout: float = 600):
    """Start one of our command lines as a user does: ``python *argv`` (a script, or ``-m`` and a module, with its
    options), with ``ranks`` the deepspeed launcher starting that many ranks, or ``launcher *argv`` (torchrun and its
    options, a job script, ...). ``env`` adds to this environment.

    With ``wait``, the finished process with stdout and stderr apart. Without, the running process with stderr in
    stdout, in a session of its own so that a test can end a launcher and all of its ranks with ``os.killpg``.
    """
    # A process group formed inside pytest (the in-process engine tests) leaves its variables behind, and a suite run
    # inside a SLURM job or under mpirun has its launcher's: a command line inheriting them would try to join that
    # group. Each one forms its own, as a user's does, from what ``env`` says.
    inherited = {k: v for k, v in os.environ.items() if not launch_variable(k)}
    env = {**inherited, **(env or {})}
    if ranks or launcher:
        cmd = [str(LAUNCHER), "--num_gpus", str(ranks), "--master_port", str(free_port())] if ranks else launcher
        env["PATH"] = str(LAUNCHER.parent) + os.pathsep + env["PATH"]  # the venv first, as `make demo` launches
    else:
        cmd = [sys.executable]
    cmd = [str(arg) for arg in [*cmd, *argv]]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def train_args(root: Path, name: str, cfg_path: Path, *extra, data: Path | None = None) -> list[str]:
    """train.py's options for a run ``name`` on ``data`` (``root/data``), logging to ``root/name``."""
    return ["-c", str(cfg_path), "--data_dir", str(data or root / "data"), "--log_dir", str(root / name),
            "--ckpt_dir", str(root / name / "ckpt"), "--hide_progress", *map(str, extra)]


def run_train(root: Path, name: str, cfg_path: Path, *extra, data: Path | None = None, env: dict | None = None,
              **run):
    """train.py through :func:`run_command` (``run``: its ``ranks``, ``wait``, ``timeout``), see :func:`train_args`."""
    # Unbuffered: the output of a killed run then ends at the step it reached, not at its last full buffer.
    env = {"PYTHONUNBUFFERED": "1", **(env or {})}
    return run_command(TRAIN_PY, *train_args(root, name, cfg_path, *extra, data=data), env=env, **run)


def metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_logged(proc: subprocess.Popen, run_dir: Path, predicate, timeout: float = 300) -> None:
    """Wait until the running ``proc`` has logged a metrics line matching ``predicate``; fail if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(predicate(m) for m in metrics(run_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the awaited step was logged"


def uninterrupted_losses(root: Path) -> tuple[Path, dict[int, float]]:
    """Data for two epochs of 12 steps in ``root/data``, its config, and the loss of every step of an uninterrupted
    run (``root/full``): what a run that was stopped and resumed must reproduce."""
    write_folder(root / "data", classes=2, per_class=24, size=36)  # 12 steps per epoch
    cfg_path = config_file(root, train={"stop_at_epoch": 2, "knn_monitor": False})
    full = run_train(root, "full", cfg_path)
    assert full.returncode == 0, full.stdout + full.stderr
    return cfg_path, {m["step"]: m["loss"] for m in metrics(root / "full") if "loss" in m}


FAKE_SLURM = """#!{python}
# {name}, as SLURM's would run here: records its command line in $SLURM_RECORD (a JSON list a line). srun then
# runs its command as task 0 of the job; scontrol prints `show hostnames`; anything else only records.
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["SLURM_RECORD"], "a") as f:
    f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "srun":
    command = sys.argv[1:]
    while command[0].startswith("-"):  # the scripts write srun's options as --name=value
        command.pop(0)
    os.environ.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    os.execvp(command[0], command)
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    sys.path.insert(0, {repo!r})
    from lcr_fast.launch import expand_nodelist
    print("\\n".join(expand_nodelist(sys.argv[3])))
"""


def fake_slurm(folder: Path, *recorders: str) -> Path:
    """``folder`` with ``srun`` and ``scontrol`` as :data:`FAKE_SLURM` describes them, and a recorder for each name of
    ``recorders`` (``python``, ``deepspeed``): put it first on PATH and set SLURM_RECORD to run a job script here."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("srun", "scontrol", *recorders):
        path = folder / name
        path.write_text(FAKE_SLURM.format(python=sys.executable, name=name, repo=str(REPO)))
        path.chmod(0o755)
    return folder


def recorded(record: Path) -> list[list[str]]:
    """The command lines the fake SLURM tools recorded, in order."""
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
