"""lcr-doctor: what this machine can run of lcr-fast, in the form a bug report wants.

    lcr-doctor                   # a table on stdout
    lcr-doctor --json            # JSON on stdout instead; --json PATH writes it there, after the table
    lcr-doctor --full            # kernels: compile every launch of the paper's runs (about a minute), not a subset
    python -m lcr_fast.doctor    # the same

It reports versions (Python, torch and its CUDA, Triton, DALI, DeepSpeed, Numba, ...), each GPU
(name, compute capability, memory, native bf16) and these checks:

- torch (required): what the trainer runs on.
- deepspeed (required): every training step goes through its engine.
- nccl: required only where more than one GPU is visible (the multi-GPU process group).
- kernels (required): on a GPU, the trainer's start-up self-check (``lcr_fast.selfcheck``) launches
  each Triton op and compares it with its torch reference; an op that fails there falls back to its
  reference, which passes ("fallback"), but an error in the check itself fails. Without a GPU the
  kernels are compiled ahead of time for sm_80 and sm_90 (``lcr_fast.kernel_aot``: one BYOL step at
  batch 16, fp32, or with ``--full`` every workload of the paper); a compile error fails, and a
  machine without Triton runs the torch references ("fallback").
- data (required): each data path builds and yields a batch from a few synthetic JPEGs in a
  temporary folder: DALI ``mixed`` (without a GPU its graph is only defined, which runs DALI's
  device checks), DALI's CPU backend, torchvision. Passes when the path the default
  ``data.backend: dali`` takes here works ("fallback" when that is not the first choice).
- step (required): 2 + 20 optimizer steps through the trainer's own ``build_engine`` and
  ``train_step`` on random images (a GPU: ResNet-50 without max-pool, batch 32, 128 px; the CPU:
  ResNet-18, batch 4, 32 px; both at precision auto, so fp32 on a CPU without AMX or AVX512-BF16);
  the loss must stay finite. Reports pairs/s.

Exit status 0 when every required check passes or falls back cleanly, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

STEP_WARMUP, STEP_COUNT = 2, 20


@dataclass
class Check:
    """One row of the report."""

    name: str
    status: str  # ok | fallback | skipped | fail; ok and fallback satisfy a required check
    detail: str
    required: bool
    data: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "fallback")


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"


def _version(module: str) -> str | None:
    """``module.__version__`` after importing it, or None when it cannot be imported."""
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # a broken install raises more than ImportError
        return None


def versions() -> dict[str, str | None]:
    try:
        ours = importlib.metadata.version("lcr-fast")
    except importlib.metadata.PackageNotFoundError:
        ours = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"lcr_fast": ours, "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": str(cudnn) if cudnn else None, "triton": _version("triton"),
            "torchvision": _version("torchvision"), "dali": _version("nvidia.dali"),
            "deepspeed": _version("deepspeed"), "numba": _version("numba"), "numpy": _version("numpy")}


def gpus() -> list[dict]:
    from lcr_fast.engine import native_bf16

    found = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        found.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                      "bf16": native_bf16(torch.device("cuda", i))})
    return found


def check_torch() -> Check:
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Check("torch", "ok", f"torch {torch.__version__} ({cuda}), {visible} GPU(s) visible", True)


def check_deepspeed() -> Check:
    import deepspeed

    return Check("deepspeed", "ok", f"deepspeed {deepspeed.__version__}", True)


def check_nccl() -> Check:
    import torch.distributed as dist

    required = torch.cuda.is_available() and torch.cuda.device_count() > 1
    if not torch.cuda.is_available():
        return Check("nccl", "skipped", "no GPU: the CPU process group uses gloo", False)
    if not dist.is_nccl_available():
        return Check("nccl", "fail", "torch was built without NCCL: one GPU only", required)
    version = ".".join(map(str, torch.cuda.nccl.version()))
    return Check("nccl", "ok", f"NCCL {version}", required)


def _aot_kernels(full: bool) -> Check:
    from lcr_fast import kernel_aot as aot

    workloads = aot.WORKLOADS if full else (aot.Workload("byol", "step", 16, "fp32", True, False),)
    scope = "every workload of the paper, 2048- and 512-channel trunks" if full else "one BYOL step, batch 16, fp32"
    launches = aot.record_workloads(workloads, archs=tuple(aot.GPU_SMS))
    try:
        compiled = aot.compile_launches(launches)
    except aot.KernelCompileError as exc:
        return Check("kernels", "fail", f"ahead-of-time compile ({scope}): {_error(exc)}", True)
    kernels = sorted({c.launch.name for c in compiled})
    archs = ", ".join(f"sm_{arch}" for arch in aot.GPU_SMS)
    return Check("kernels", "ok", f"no GPU: {len(compiled)} launches of {len(kernels)} kernels compile for {archs} "
                 f"({scope}); this machine runs the torch references", True, {"compiled": kernels})


def check_kernels(full: bool = False) -> Check:
    from lcr_fast import selfcheck
    from lcr_fast.engine import native_bf16
    from lcr_fast.kernels import dispatch

    if not dispatch.HAS_TRITON:
        return Check("kernels", "fallback", "Triton is not installed: every op runs its torch reference", True)
    if not torch.cuda.is_available():
        return _aot_kernels(full)
    device = torch.device("cuda", torch.cuda.current_device())
    dtypes = (torch.float32, torch.bfloat16) if native_bf16(device) else (torch.float32,)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallbacks are in the report
        paths = selfcheck.check_kernels(device, strict=False, dtypes=dtypes)
    seconds = time.perf_counter() - start
    fell_back = {op: path for op, path in paths.items() if not path.startswith("triton")}
    status = "fallback" if fell_back else "ok"
    detail = (f"{len(paths) - len(fell_back)} of {len(paths)} ops pass their self-check on {device} "
              f"({', '.join(map(str, dtypes))}) in {seconds:.1f} s")
    if fell_back:
        detail += "; " + "; ".join(f"{op}: {path}" for op, path in fell_back.items())
    return Check("kernels", status, detail, True, {"paths": paths, "seconds": round(seconds, 3)})


def _one_batch(path: str, data_dir: str, device: torch.device) -> None:
    from lcr_fast.data import build_train_loader

    loader = build_train_loader(data_dir, recipe="byol", batch_size=4, image_size=64, backend=path, device=device,
                                num_threads=1, seed=0)
    if path == "torchvision":
        next(iter(loader))
    else:
        loader.check()


def _define_mixed(data_dir: str) -> None:
    """The GPU graph, defined without a GPU: DALI's checks of operator devices and argument inputs."""
    from lcr_fast.data import build_train_loader

    loader = build_train_loader(data_dir, recipe="byol", batch_size=4, image_size=64, backend="dali-mixed",
                                device="cuda:0", num_threads=1, seed=0)
    loader.define(device_id=None)


def check_data() -> Check:
    from lcr_fast.data import data_paths
    from lcr_fast.data.synthetic import write_dataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data_dir = str(write_dataset(tmp, 2, 4, 2, image_size=(80, 60), seed=0))
        for path in ("dali-mixed", "dali-cpu", "torchvision"):
            try:
                if path == "dali-mixed" and device.type != "cuda":
                    _define_mixed(data_dir)
                    results[path] = "skipped: no GPU; its graph defines (DALI's device checks pass)"
                    continue
                _one_batch(path, data_dir, device)
                results[path] = "ok"
            except Exception as exc:  # a path fails in as many ways as DALI and its imports do
                results[path] = f"fail: {_error(exc)}"
    candidates = data_paths("dali", device)
    chosen = next((path for path in candidates if results[path] == "ok"), None)
    detail = "; ".join(f"{path} {result}" for path, result in results.items())
    if chosen is None:
        return Check("data", "fail", f"no data path works: {detail}", True, {"paths": results})
    status = "ok" if chosen == candidates[0] else "fallback"
    return Check("data", status, f"data.backend=dali takes {chosen} here; {detail}", True,
                 {"paths": results, "chosen": chosen})


def check_step() -> Check:
    from lcr_fast import engine as eng
    from lcr_fast.config import load_config
    from lcr_fast.loop import StepParts, train_step
    from lcr_fast.optim import build_schedule
    from lcr_fast.train import build_engine

    gpu = torch.cuda.is_available()
    # A GPU: the paper's trunk (no stem max-pool). The CPU: seconds on two shared cores.
    arch, maxpool, batch, size = ("resnet50_cub200", False, 32, 128) if gpu else ("resnet18", True, 4, 32)
    cfg = load_config(None, {"model": {"backbone": arch, "maxpool": maxpool, "pretrained": "none"},
                             "train": {"batch_size": batch}, "dataset": {"image_size": size},
                             "engine": {"precision": "auto", "strict": True}})
    info = eng.init_distributed(cfg.engine.dist_timeout_s)
    precision = eng.resolve_precision(cfg.engine.precision, info.device, strict=True)
    model, engine, optimizer, _ = build_engine(cfg, info, precision)
    parts = StepParts(engine=engine, model=model, optimizer=optimizer,
                      schedule=build_schedule(cfg, STEP_WARMUP + STEP_COUNT), pieces=1,
                      channels_last=cfg.engine.channels_last)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, size, size, generator=g).to(info.device) for _ in range(2)]
    for i in range(STEP_WARMUP):
        train_step(parts, [views], i)
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(STEP_WARMUP, STEP_WARMUP + STEP_COUNT):
        result = train_step(parts, [views], i)
    loss = float(result.terms.sum())  # waits for the device
    seconds = (time.perf_counter() - start) / STEP_COUNT
    data = {"arch": arch, "batch": batch, "image_size": size, "precision": precision, "device": str(info.device),
            "s_per_step": seconds, "pairs_per_s": batch / seconds, "loss": loss}
    shape = f"{arch}, batch {batch}, {size} px, {precision}"
    if not math.isfinite(loss):
        return Check("step", "fail", f"{STEP_COUNT} steps ({shape}) ended with a non-finite loss {loss}", True, data)
    return Check("step", "ok", f"{STEP_COUNT} steps ({shape}): {batch / seconds:.1f} pairs/s, {seconds:.3f} s/step",
                 True, data)


def run_check(name: str, check: Callable[[], Check], required: bool) -> Check:
    """``check()``, or a failed row naming what it raised: one broken component must not hide the others."""
    try:
        return check()
    except Exception as exc:  # the report is for broken installs: anything may raise
        return Check(name, "fail", _error(exc), required)


@contextlib.contextmanager
def _output_to_stderr() -> Iterator[None]:
    """Within the block, whatever is written to stdout goes to stderr, at the file descriptor: DeepSpeed
    logs to stdout and DALI's C++ prints there, and stdout must hold the table or the JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def report(full: bool = False) -> dict:
    """Versions, GPUs and every check, as the JSON that ``--json`` writes; ``ok`` is the exit status's verdict."""
    checks = [run_check("torch", check_torch, True), run_check("deepspeed", check_deepspeed, True),
              run_check("nccl", check_nccl, False), run_check("kernels", lambda: check_kernels(full), True),
              run_check("data", check_data, True), run_check("step", check_step, True)]
    return {"ok": all(c.passed for c in checks if c.required), "versions": versions(), "gpus": gpus(),
            "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in checks}}


def table(result: dict) -> str:
    lines = ["lcr-doctor", ""]
    lines += [f"  {name:<12} {value or 'not installed'}" for name, value in result["versions"].items()]
    lines.append("")
    for gpu in result["gpus"] or [{"name": "none visible"}]:
        extra = (f", capability {gpu['capability']}, {gpu['memory_gib']} GiB, {gpu['sms']} SMs, "
                 f"bf16 {'yes' if gpu['bf16'] else 'no'}") if "index" in gpu else ""
        lines.append(f"  GPU {gpu.get('index', '-')}: {gpu['name']}{extra}")
    lines += ["", f"  {'check':<10} {'status':<9} {'required':<9} detail"]
    for name, check in result["checks"].items():
        lines.append(f"  {name:<10} {check['status']:<9} {'yes' if check['required'] else 'no':<9} {check['detail']}")
    verdict = "every required component works" if result["ok"] else "a required component FAILED"
    return "\n".join(lines + ["", verdict])


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(prog="lcr-doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the report as JSON to PATH (or, without one, print it instead of the table)")
    parser.add_argument("--full", action="store_true",
                        help="without a GPU: compile the kernels for every workload of the paper, not one step")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _output_to_stderr():
        result = report(args.full)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0 if result["ok"] else 1


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
