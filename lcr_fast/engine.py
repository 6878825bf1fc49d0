"""Process-group setup, precision and the DeepSpeed engine around our model and optimizer."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError
from .errors import FallbackError


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
                f"cannot form the process group at {address} "
                f"(rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}): "
                f"{str(exc).splitlines()[0]}. Is another run using that port? Pick a free one with --master_port "
                f"(deepspeed) or MASTER_PORT."
            ) from exc
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cpu_bf16_instructions() -> str | None:
    """This CPU's native bf16 arithmetic as torch's CPU dispatch sees it: ``AMX`` (every CPU with AMX tiles
    has AMX-BF16), ``AVX512-BF16``, or None where bf16 is emulated: on the AVX2-only EPYC of our
    development machine a 2048^3 bf16 matmul ran at 0.3 GFLOP/s against 126 in fp32, and the
    BYOL+LCR step 12x slower than in fp32."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU of compute capability 8.0 and up (torch's own
    check counts emulation too, under which bf16 autocast runs but slower than fp32), or a CPU with
    AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16_instructions() is not None


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # what the run computes in: fp32 | bf16 | fp16
    reason: str  # why, for components.json and the report


def choose_precision(precision: str, device: torch.device, strict: bool = False) -> PrecisionChoice:
    """``auto`` is bf16 where the device computes bf16 natively (a GPU from compute capability 8.0, a
    CPU with AMX or AVX512-BF16) and fp32 elsewhere. An explicit bf16 on a GPU without it trains in
    fp32 after a warning, or raises FallbackError with ``strict`` (engine.strict); on such a CPU it
    runs as asked (correct there, only slow) after a warning."""
    if precision == "auto":
        if device.type == "cuda":
            if native_bf16(device):
                return PrecisionChoice("bf16", "auto: this GPU computes bf16 natively, compute capability 8.0 or up")
            return PrecisionChoice("fp32", "auto: this GPU has no native bf16, compute capability below 8.0")
        found = cpu_bf16_instructions()
        if found:
            return PrecisionChoice("bf16", f"auto: this CPU computes bf16 natively with {found}")
        return PrecisionChoice("fp32", "auto: this CPU has neither AMX nor AVX512-BF16, so no native bf16")
    if precision == "bf16" and not native_bf16(device):
        if device.type == "cuda":
            message = "engine.precision=bf16, but this GPU has no native bf16 (compute capability below 8.0)"
            if strict:
                raise FallbackError(f"{message}; engine.strict forbids falling back to fp32")
            warnings.warn(f"{message}: training in fp32 instead")
            return PrecisionChoice("fp32", "fallback: engine.precision=bf16 unsupported here")
        warnings.warn("engine.precision=bf16 on a CPU without native bf16 (no AMX or AVX512-BF16): bf16 is emulated "
                      "here and many times slower than fp32 (engine.precision=auto picks fp32)")
        return PrecisionChoice("bf16", "engine.precision=bf16, emulated: this CPU has neither AMX nor AVX512-BF16")
    return PrecisionChoice(precision, f"engine.precision={precision}")


def resolve_precision(precision: str, device: torch.device, strict: bool = False) -> str:
    """The precision ``choose_precision`` picks."""
    return choose_precision(precision, device, strict).precision


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for evaluation; training gets the same from DeepSpeed's ``torch_autocast``."""
    if precision in _AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def micro_batch_size(cfg, world_size: int) -> int:
    """Samples per rank per forward: the global ``train.batch_size`` over ranks and accumulated micro-batches."""
    accum = cfg.engine.grad_accum_steps
    if cfg.train.batch_size % (world_size * accum):
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world_size} rank(s) x "
                          f"{accum} accumulated micro-batch(es)")
    return cfg.train.batch_size // (world_size * accum)


def check_device_options(cfg, device: torch.device) -> None:
    """The checks that need the device (the config's own are in ``config.validate``)."""
    if cfg.engine.sync_bn and device.type != "cuda":
        raise ConfigError(f"engine.sync_bn needs CUDA (torch's SyncBatchNorm); this run is on {device.type}")


def deepspeed_config(cfg, world_size: int, precision: str) -> dict:
    """DeepSpeed settings: the LR schedule is ours; the engine does data parallelism, gradient
    accumulation and reduction, ZeRO partitioning, autocast and fp16 loss scaling."""
    config = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.engine.grad_accum_steps,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision in _AUTOCAST_DTYPES:
        # Autocast with fp32 parameters (so fp32 master weights, BN statistics, EMA target and queue); fp16
        # adds a dynamic loss scaler (torch's GradScaler). No module is listed as safe for lower-precision
        # gradient communication: gradients are reduced in fp32.
        config["torch_autocast"] = {"enabled": True, "dtype": str(_AUTOCAST_DTYPES[precision]).removeprefix("torch."),
                                    "lower_precision_safe_modules": []}
    return config


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, world_size: int, precision: str):
    import deepspeed

    config = deepspeed_config(cfg, world_size, precision)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


ZERO_TAG = "zero_optimizer_step"  # + the step: the engine's checkpoint of ZeRO's partitioned optimizer state


def save_zero_state(engine, ckpt_dir: str, step: int) -> str:
    """Every rank writes its optimizer partition under a tag of its own step (a collective: all ranks
    call it); returns the tag, which last.pt records. A run killed before last.pt is replaced leaves
    the older tag, the one the older last.pt names, intact."""
    tag = f"{ZERO_TAG}{step}"
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    return tag


def remove_stale_zero_states(ckpt_dir: str, keep: str) -> None:
    """After last.pt names ``keep``, the partitions of earlier steps are unreachable."""
    for name in os.listdir(ckpt_dir):
        if name.startswith(ZERO_TAG) and name != keep:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def load_zero_state(engine, ckpt_dir: str, tag: str) -> None:
    engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                           load_lr_scheduler_states=False)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
