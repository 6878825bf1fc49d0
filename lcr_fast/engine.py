"""Process-group setup, precision and the DeepSpeed engine around our model and optimizer."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError
from .errors import FallbackError, UserError
from .launch import Launch, read_launch


class ProcessGroupError(UserError, RuntimeError):
    """The ranks could not form their process group (port in use, unreachable master, timeout)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launch: Launch | None = None  # what the launcher announced (lcr_fast.launch)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_launch(local_rank: int | None = None) -> Launch:
    """The launch this process's environment describes (``lcr_fast.launch.read_launch``), with a free
    local port for a group of one and the deepspeed launcher's ``--local_rank`` (``local_rank``) applied."""
    launch = read_launch(os.environ)
    if launch.master_port is None:
        launch = replace(launch, master_port=_free_port())
    if local_rank is not None and local_rank >= 0:
        launch = replace(launch, local_rank=local_rank)
    return launch


def _cuda_index(local_rank: int) -> int:
    # srun --gpus-per-task (or a GPU binding) shows each task only its own GPU, as device 0.
    count = torch.cuda.device_count()
    return local_rank if local_rank < count else local_rank % count


def _wait_for_master(launch: Launch, timeout_s: int) -> None:
    """Wait at most ``timeout_s`` for rank 0's store to listen: torch's own client retries with a back-off that
    lets it give up only after two to three times the timeout. A connection that closes at once is harmless there."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            left = max(deadline - time.monotonic(), 0.1)
            socket.create_connection((launch.master_addr, launch.master_port), timeout=min(left, 5)).close()
            return
        except OSError as exc:  # refused, unreachable, or a name not resolvable yet
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for rank 0 to listen ({exc})") from exc
            time.sleep(0.5)


def _join_error(launch: Launch, timeout_s: int, exc: BaseException) -> str:
    """One line: where the group was to form, what torch said, and what to check."""
    cause = str(exc).splitlines()[0].rstrip(".")
    message = (f"cannot form the process group at {launch.master_addr}:{launch.master_port} (rank {launch.rank} of "
               f"{launch.world_size}, launcher {launch.launcher}): {cause}.")
    if "timed out" in cause.lower():
        started = ("srun start every task of the step (SLURM_NTASKS)" if launch.launcher == "slurm" else
                   "mpirun start every rank" if launch.launcher in ("openmpi", "mvapich", "mpich") else
                   "every rank start")
        return (f"{message} Not all {launch.world_size} processes joined within engine.dist_timeout_s={timeout_s} s: "
                f"did {started}, and can each reach {launch.master_addr}:{launch.master_port} (MASTER_ADDR, "
                "MASTER_PORT; GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on hosts with several interfaces)?")
    return (f"{message} Is another run using that port? Pick a free one with --master_port (deepspeed) or "
            "MASTER_PORT.")


def init_distributed(timeout_s: int = 600, local_rank: int | None = None, launch: Launch | None = None) -> DistInfo:
    """Join the process group ``launch`` (by default :func:`resolve_launch`) describes: deepspeed's,
    torchrun's, srun's or an MPI launcher's, or a group of one on a free local port for a plain
    ``python lcr_fast/train.py``, so that all of them run the same code. Ranks that do not all arrive
    within ``timeout_s`` end in a ProcessGroupError."""
    import deepspeed

    launch = launch or resolve_launch(local_rank)
    if torch.cuda.is_available():
        index = _cuda_index(launch.local_rank)
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        index, device = launch.local_rank, torch.device("cpu")
    # DeepSpeed and torch read the group from these; with all five set, DeepSpeed's own MPI discovery stays out.
    # DeepSpeed takes LOCAL_RANK for the CUDA device it binds (init_process_group's device_id, the engine's
    # set_device): it must name this process's GPU among those it sees, not the launcher's local rank.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(index),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        # DeepSpeed's engine asserts that OpenMPI's local rank equals LOCAL_RANK.
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)
    if not dist.is_initialized():
        try:
            if launch.rank > 0:
                _wait_for_master(launch, timeout_s)
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       timeout=timedelta(seconds=timeout_s), verbose=False)
        except (RuntimeError, OSError) as exc:  # torch raises DistNetworkError / DistStoreError, both RuntimeErrors
            raise ProcessGroupError(_join_error(launch, timeout_s, exc)) from exc
    return DistInfo(dist.get_rank(), dist.get_world_size(), launch.local_rank, device, launch)


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
        # On by default, the throughput timer synchronises the device at every forward and step: the host
        # could never run ahead of the GPU. We time steps ourselves, at log intervals.
        "timers": {"throughput": {"enabled": False}},
        # The reference clips nothing; DeepSpeed 0.19.8 clips the global gradient norm at 1.0 unless told not to
        # (BYOL's is ~10 at the start: every step was scaled down, the BatchNorm and bias updates with it).
        "gradient_clipping": 0.0,
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
    if world_size == 1 and cfg.engine.zero_stage == 0:
        # Alone, DeepSpeed still flattens every gradient into one buffer, "averages" it over one rank and
        # copies it back: ~0.1 s of BYOL's ResNet-50 CPU step (docs/benchmarks.md). ZeRO keeps its
        # reduction: its epilogue is what moves gradients into the optimizer's partitions.
        engine.enable_backward_allreduce = False
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
