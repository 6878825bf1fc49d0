"""Process-group setup, precision and the DeepSpeed engine around our model and optimizer."""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class ProcessGroupError(RuntimeError):
    """The ranks could not form their process group (port in use, unreachable master, timeout)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 600, local_rank: int | None = None) -> DistInfo:
    """Join the process group the launcher describes (RANK, WORLD_SIZE, ...), or form a group of one.

    ``deepspeed`` and ``torchrun`` set the variables; a plain ``python lcr_fast/train.py`` gets a
    single-process group on a free local port, so both run the same code.
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if local_rank is None or local_rank < 0:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       timeout=timedelta(seconds=timeout_s), verbose=False)
        except (RuntimeError, OSError) as exc:  # torch raises DistNetworkError / DistStoreError, both RuntimeErrors
            address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise ProcessGroupError(
                f"cannot form the process group at {address} (rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}): "
                f"{str(exc).splitlines()[0]}. Is another run using that port? Pick a free one with --master_port "
                f"(deepspeed) or MASTER_PORT."
            ) from exc
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports it and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16":
        raise ValueError("engine.precision=fp16 is not supported yet: use bf16 (autocast) or fp32")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast with fp32 master weights: parameters, BN statistics and the EMA target stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def deepspeed_config(cfg, world_size: int) -> dict:
    """DeepSpeed settings: precision is our autocast, the LR schedule ours, so the engine does data
    parallelism, gradient reduction and the optimizer step."""
    if cfg.train.batch_size % world_size:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by the {world_size} ranks")
    if cfg.engine.zero_stage != 0 and cfg.train.optimizer.name == "lars_simclr":
        raise ValueError(
            f"engine.zero_stage={cfg.engine.zero_stage} hands LARS one flattened tensor, so its per-layer trust "
            "ratios would be computed over the whole model: use zero_stage 0 with lars_simclr"
        )
    if cfg.engine.zero_stage == 3:
        raise ValueError("engine.zero_stage=3 partitions parameters, which breaks GradCAM's autograd.grad on layer4")
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, world_size: int):
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size))
    return engine, optimizer


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
