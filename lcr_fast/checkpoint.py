"""Checkpoint files: written atomically, read without executing code.

A training checkpoint is one file holding the model (our key names), the optimizer, the schedule
position (epoch, step), every RNG state and the final config, so ``--resume`` continues exactly.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import socket
import tempfile
import warnings
import zipfile
from typing import Any, Iterator

import numpy as np
import torch

from .errors import UserError


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint that needs arbitrary code to unpickle."""


class NotACheckpointError(UserError, ValueError):
    """A file given as a checkpoint that is not one, or is damaged."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (unwritable folder, full disk); the previous one is intact."""


class CheckpointLockError(UserError, RuntimeError):
    """Another live run writes checkpoints to the same folder."""


LOCK_NAME = ".lcr-fast.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[str]:
    """Hold ``folder/.lcr-fast.lock`` for the run, so two runs cannot overwrite each other's checkpoints.

    A lock left by a process of this host that no longer exists (a run killed with -9) is stale: it is
    removed with a warning. A live holder, or one on another host, is an error naming it.
    """
    path = os.path.join(os.fspath(folder), LOCK_NAME)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                pid_text, _, host = f.read().strip().partition(" ")
            pid = int(pid_text) if pid_text.isdigit() else -1
            if host == socket.gethostname() and pid > 0 and not _pid_alive(pid):
                warnings.warn(f"removing a stale lock {path} left by process {pid}, which no longer runs")
                os.unlink(path)
                continue
            raise CheckpointLockError(
                f"checkpoint folder {os.fspath(folder)!r} is in use by another run "
                f"(process {pid_text} on {host or '?'}); "
                f"use another --ckpt_dir, or delete {path} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def check_creatable(folder: str | os.PathLike, what: str) -> None:
    """Fail now if ``folder`` could not be created or written to, without creating anything: its
    nearest existing ancestor must be a writable directory."""
    path = os.path.abspath(os.fspath(folder))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointWriteError(f"cannot write {what} to {os.fspath(folder)!r}: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointWriteError(f"cannot write {what} to {os.fspath(folder)!r}: {existing!r} is not writable")


def check_writable(folder: str | os.PathLike, what: str = "checkpoints") -> None:
    """Fail now, not after hours of training, if ``what`` cannot be written to ``folder``."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write {what} to {folder!r}: {exc.strerror or exc}") from exc


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk at any point leaves either the old file or the new one, never a torn one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Fail in a line, from the file's first bytes, unless ``path`` can be a torch.save file: a zip
    archive (torch >= 1.6) or a pickle (older torch's format)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise NotACheckpointError(f"{path!r} is not a PyTorch checkpoint "
                                  "(neither a torch.save zip archive nor a pickle)")


def safe_load(path: str | os.PathLike) -> Any:
    """torch.load with ``weights_only=True``: tensors and plain containers only; a pickle that
    would run code is refused, always."""
    path = os.fspath(path)
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError) as exc:  # a damaged archive or a truncated pickle
        raise NotACheckpointError(f"{path!r} cannot be read as a checkpoint: {str(exc).splitlines()[0]}") from exc
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refused to load {path!r}: it contains objects other than tensors and plain containers, which could "
            f"run code when unpickled ({str(exc).splitlines()[0]}). If you trust the file, re-save just its weights "
            "as a plain state dict, e.g. torch.save({'state_dict': torch.load(path, weights_only=False)"
            "['state_dict']}, 'weights.pth'), and load that file instead."
        ) from exc


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        # One state per device visible when saved: a run resumed with fewer visible (one GPU, or a GPU per
        # task) restores those it has; devices beyond the saved ones keep their own.
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def save_training_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                             epoch: int, step: int, config: dict, extra: dict | None = None,
                             runs: list[dict] | None = None) -> None:
    """``epoch`` is the next epoch to run and ``step`` the number of optimizer steps taken. ``optimizer``
    None: its state is kept elsewhere (ZeRO's per-rank partitions, written by the engine). ``runs``: the
    record (``lcr_fast.run_info``) of each run that trained these weights, the writer's last; checkpoints
    written before it existed have no ``runs``, and load as they are."""
    state = {
        "format": "lcr-fast/1",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
        "runs": runs or [],
    }
    try:
        atomic_save(state, path)
    except OSError as exc:
        raise CheckpointWriteError(
            f"cannot write checkpoint {os.fspath(path)!r}: {exc.strerror or exc}; "
            "the previous checkpoint there, if any, is intact"
        ) from exc


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "lcr-fast/1":
        raise NotACheckpointError(f"{os.fspath(path)!r} is not an lcr-fast training checkpoint "
                         "(for the reference's files use lcr_fast.compat.load_reference_checkpoint)")
    return ckpt
