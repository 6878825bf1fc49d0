"""What a run ran on and how it was started, for results.json, report.md and every checkpoint: the launcher,
the ranks and their hosts and devices, the versions of what computes, lcr-fast's git commit, the command line."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torchvision

import lcr_fast

from .launch import Launch


def _distribution(*names: str) -> str | None:
    """The installed version of the first distribution of ``names``; a name ending in ``*`` matches any suffix
    (DALI's wheel is named after its CUDA: nvidia-dali-cuda120, -cuda130). Read from the metadata, not by
    importing: a run on torchvision data should not load DALI to name its version."""
    for name in names:
        if name.endswith("*"):
            found = sorted((d.metadata["Name"] or "") for d in importlib.metadata.distributions()
                           if (d.metadata["Name"] or "").lower().startswith(name[:-1]))
            if found:
                return importlib.metadata.version(found[0])
            continue
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _nccl() -> str | None:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):  # a CPU-only build of torch has no NCCL
        return None


def versions() -> dict[str, str | None]:
    """The versions that decide what a run computes; None where a package is absent."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": cudnn or None, "nccl": _nccl() if torch.version.cuda else None,
             "triton": _distribution("triton", "pytorch-triton"), "dali": _distribution("nvidia-dali*"),
             "deepspeed": _distribution("deepspeed"), "torchvision": torchvision.__version__,
             "lcr_fast": lcr_fast.__version__}
    # Plain strings: torch.__version__ is a str subclass that a weights_only checkpoint load refuses to unpickle.
    return {name: None if version is None else str(version) for name, version in found.items()}


def git_commit(folder: str | None = None) -> dict | None:
    """``{"commit", "dirty"}`` of the checkout lcr-fast runs from, or None when it is installed (no ``.git``
    beside the package: git would otherwise report whatever repository happens to hold site-packages)."""
    root = folder or os.path.dirname(os.path.dirname(os.path.abspath(lcr_fast.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no git, or not a usable repository
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def this_rank(launch: Launch, device: torch.device) -> dict:
    return {"host": socket.gethostname(), "node_rank": launch.node_rank, "local_rank": launch.local_rank,
            "device": device_name(device)}


def gather_ranks(launch: Launch, device: torch.device) -> list[dict]:
    """:func:`this_rank` of every rank, in rank order (a collective: every rank calls it)."""
    mine = this_rank(launch, device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return ranks


def collect(launch: Launch, device: torch.device, ranks: list[dict], first_step: int = 0) -> dict:
    """The run's record: ``launch`` (rank 0's) and every rank's host and device (:func:`gather_ranks`); ``first_step``
    is the optimizer step it started from (0, or where it resumed)."""
    hosts = list(dict.fromkeys(r["host"] for r in ranks))
    return {"launcher": launch.launcher, "world_size": launch.world_size,
            "nodes": launch.nodes if launch.nodes is not None else len(hosts), "hosts": hosts,
            "master": f"{launch.master_addr}:{launch.master_port}", "device": device.type, "ranks": ranks,
            "versions": versions(), "git": git_commit(), "command": [sys.executable, *sys.argv],
            "first_step": first_step}
