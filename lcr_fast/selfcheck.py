"""Start-up self-check: which path each component takes on this machine, decided once per process.

Fast paths that can fail on a particular GPU, driver or install are tried once, cheaply, before
training, and a failure switches that one component to its slower path with one warning:

- each Triton op (``lcr_fast.kernels``) runs on small inputs on the run's device and is compared
  with its torch reference, forward and backward (``rationale_pool``: forward only). An exception or
  a mismatch switches that op to its reference on the backend the check is given (the process's
  ``kernels.BACKEND``, ``KernelBackend.disable``).
  fp32 inputs, and the autocast dtype too when the run trains in bf16 or fp16 on a GPU. The first
  check of a kernel pays its Triton compile (seconds when Triton's cache is cold, milliseconds warm).
- on the CPU, the ResNet trunks' fused BatchNorm + add + ReLU (``kernels.batch_norm_act``, C++) is built
  (once per machine) and compared with torch's ops, forward and backward; a failure switches it off.
- the data path: DALI ``mixed``, then DALI's CPU backend, then torchvision (``lcr_fast.data.checked_loader``).
- precision: ``auto`` is bf16 where the GPU or CPU computes it natively, fp32 elsewhere; an explicit bf16
  on a GPU without native bf16 trains in fp32 (``engine.choose_precision``, which says why).
- ``engine.compile``: the compiled ResNet trunks run one forward (and backward) at the training
  shape; a failure puts them back to eager. Training then reuses what this compiled.

``engine.strict`` turns every fallback into a FallbackError (``kernels.backend=triton``, or
``LCR_KERNELS=triton``, does so for the kernels): benchmarks and bug reports want the path asked for
or nothing. Without CUDA the kernels take their torch path and are not checked, which the record
says ("torch (no CUDA)"); under ``TRITON_INTERPRET=1`` with ``LCR_KERNELS=triton`` the check runs the
Triton ops in the interpreter on CPU tensors. A kernel that corrupts the CUDA context (an illegal
address) cannot be survived by any fallback: that error ends the run, as it would at its first step.

The record (``Components.to_dict``) goes to ``components.json`` in the log folder, under
"components" in results.json, and into report.md.
"""
from __future__ import annotations

import importlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lcr_fast import engine as eng
from lcr_fast import kernels as K
from lcr_fast.config import Config
from lcr_fast.errors import FallbackError
from lcr_fast.kernels import dispatch
from lcr_fast.models import eager_backbones
from lcr_fast.models.backbone import ResNetTrunk

bna = importlib.import_module("lcr_fast.kernels.batch_norm_act")  # the package re-exports the function

# Tolerance relative to the reference's largest magnitude: loose enough for bf16 rounding and Triton's
# summation orders, tight enough that a wrong index, mask or stride (errors of order 1) cannot pass.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class OpCase:
    """One call of an op: fp32 inputs drawn on the CPU, the public op and its reference on them, and
    the inputs whose gradients are compared (none: forward only)."""

    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    op: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    wrt: tuple[int, ...] = ()


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _unit(g: torch.Generator, *shape: int, dim: int = 1) -> torch.Tensor:
    return F.normalize(_randn(g, *shape), dim=dim)


def _gradcam_inputs(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """feat and a gradient whose cam is +-sum_c feat^2 at each pixel: both sides of the ReLU and none near
    its kink, where summation order alone could flip a pixel and fail a correct kernel (in bf16 often)."""
    feat = _randn(g, 2, 5, 3, 4)
    return feat, feat * _randn(g, 2, 1, 3, 4).sign()


# Small, irregular shapes (no dimension a multiple of a block), both rationale_map and rationale_kl modes.
# Each op is looked up on the package at call time, so that what runs is what training would call.
OP_CASES: dict[str, tuple[OpCase, ...]] = {
    "gradcam": (OpCase(_gradcam_inputs, lambda f, d: K.gradcam(f, d), lambda f, d: K.gradcam_torch(f, d),
                       wrt=(0,)),),
    "rationale_map": tuple(
        OpCase(lambda g: (_randn(g, 3, 5, 3, 4),), lambda y, s=per_sample: K.rationale_map(y, s),
               lambda y, s=per_sample: K.rationale_map_torch(y, s), wrt=(0,))
        for per_sample in (False, True)),
    "rationale_kl": tuple(
        OpCase(lambda g: (_randn(g, 2, 3, 4).relu(), _randn(g, 2, 3, 4).sigmoid()),
               lambda c, a, t=t, f=flat: K.rationale_kl(c, a, t, f),
               lambda c, a, t=t, f=flat: K.rationale_kl_torch(c, a, t, f), wrt=(0, 1))
        for t, flat in ((0.4, True), (1.0, False))),
    "infonce_queue": (OpCase(lambda g: (_unit(g, 3, 8), _unit(g, 3, 8), _unit(g, 8, 40, dim=0)),
                             lambda q, k, queue: K.infonce_queue(q, k, queue, 0.2),
                             lambda q, k, queue: K.infonce_queue_torch(q, k, queue, 0.2), wrt=(0, 1)),),
    "byol_loss": (OpCase(lambda g: tuple(_randn(g, 3, 8) for _ in range(4)),
                         lambda *x: K.byol_loss(*x), lambda *x: K.byol_loss_torch(*x), wrt=(0, 2)),),
    "rationale_pool": (OpCase(lambda g: (_randn(g, 2, 5, 3, 4), _randn(g, 2, 3, 4).sigmoid()),
                              lambda f, a: K.rationale_pool(f, a), lambda f, a: K.rationale_pool_torch(f, a)),),
}


def _difference(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why ``got`` does not match ``want``, or None."""
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    if not bool(torch.isfinite(got).all()):
        return "non-finite values"
    error, scale = float((got - want).abs().max()), max(float(want.abs().max()), 1e-3)
    if error > TOLERANCE[dtype] * scale:
        return f"max error {error:.3g} at magnitude {scale:.3g}"
    return None


def _check_case(case: OpCase, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> str | None:
    """Runs the op (on its Triton path) and its reference on the same inputs; the first difference, or None."""
    inputs = [t.to(device=device, dtype=dtype) for t in case.inputs(g)]
    ours = [t.clone().requires_grad_(i in case.wrt) for i, t in enumerate(inputs)]
    theirs = [t.clone().requires_grad_(i in case.wrt) for i, t in enumerate(inputs)]
    with torch.set_grad_enabled(bool(case.wrt)):
        out, want = case.op(*ours), case.reference(*theirs)
    problem = _difference(out, want, dtype)
    if problem:
        return f"forward: {problem}"
    if not case.wrt:
        return None
    upstream = _randn(g, *out.shape).to(device=device, dtype=out.dtype)
    grads = torch.autograd.grad(out, [ours[i] for i in case.wrt], upstream)
    wanted = torch.autograd.grad(want, [theirs[i] for i in case.wrt], upstream.to(want.dtype))
    for i, got_grad, want_grad in zip(case.wrt, grads, wanted):
        problem = _difference(got_grad, want_grad, dtype)
        if problem:
            return f"gradient of input {i}: {problem}"
    return None


def _not_checked(device: torch.device, mode: str) -> str | None:
    """Why no op takes its Triton path on ``device`` in ``mode`` (then nothing is checked), or None."""
    if mode == "torch":
        return "torch (LCR_KERNELS=torch)"
    if mode == "auto" and not dispatch.HAS_TRITON:
        return "torch (Triton not installed)"
    if mode == "auto" and device.type != "cuda":
        return "torch (no CUDA)"
    return None


def check_kernels(device: torch.device | str, strict: bool = False, dtypes: Sequence[torch.dtype] = (torch.float32,),
                  backend: dispatch.KernelBackend = dispatch.BACKEND) -> dict[str, str]:
    """``op -> path`` for every Triton op: "triton" (or "triton (interpreter)"), or "torch (<why>)".

    Each op that would take its Triton path on ``device`` runs ``OP_CASES`` in each of ``dtypes``
    against its reference; on an exception or a mismatch the op is disabled on ``backend`` with one
    warning naming it and the error, or FallbackError is raised with ``strict``. Ops disabled by an
    earlier check are re-decided.
    """
    device = torch.device(device)
    backend.enable_all()
    skipped = _not_checked(device, backend.mode)
    if skipped:
        return {op: skipped for op in OP_CASES}
    g = torch.Generator().manual_seed(0)
    paths = {}
    for op, cases in OP_CASES.items():
        try:
            problem = next((p for dtype in dtypes for case in cases if (p := _check_case(case, device, dtype, g))),
                           None)
        except Exception as exc:  # a kernel that does not build or launch here fails in many ways
            problem = _one_line(exc)
        if problem is None:
            paths[op] = "triton" if device.type == "cuda" else "triton (interpreter)"
            continue
        paths[op] = _fall_back(backend, op, "its Triton path", problem, strict,
                               "engine.strict or kernels.backend=triton forbids falling back to its torch reference",
                               "using its torch reference instead")
    return paths


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _fall_back(backend: dispatch.KernelBackend, op: str, path: str, problem: str, strict: bool, forbidden: str,
               instead: str) -> str:
    """``op``'s ``path`` failed its check: FallbackError with ``strict``, else the op is switched off on
    ``backend`` with one warning; returns the path recorded."""
    message = f"kernel {op}: {path} failed the start-up check ({problem})"
    if strict:
        raise FallbackError(f"{message}; {forbidden}")
    backend.disable(op, problem)
    warnings.warn(f"{message}; {instead}")
    return f"torch (fallback: {problem})"


def _batch_norm_act_problem(dtype: torch.dtype, g: torch.Generator) -> str | None:
    """The fused CPU BatchNorm + add + ReLU against its plain path, forward and backward, on one batch and on two
    views of one (per-view statistics), or None."""
    x = _randn(g, 4, 6, 5, 4).to(dtype).contiguous(memory_format=torch.channels_last)
    residual = _randn(g, 4, 6, 5, 4).to(dtype).contiguous(memory_format=torch.channels_last)
    upstream = _randn(g, 4, 6, 5, 4)
    for views in (1, 2):
        results = []
        # The operator itself, not the path batch_norm_act would choose: an op an earlier check switched off on the
        # process's backend would otherwise be compared with itself.
        for fused in (True, False):
            bn = nn.BatchNorm2d(6)
            # The plain path in fp32: in bf16 it rounds after the BatchNorm and again after the add, and a value
            # rounded to either side of 0 flips the ReLU's mask.
            ins = [(t if fused else t.float()).clone().requires_grad_() for t in (x, residual)]
            path = bna.batch_norm_act_fused if fused else bna.batch_norm_act_torch
            y = path(ins[0], bn, ins[1], views=views)
            grads = torch.autograd.grad(y, ins, upstream.to(y.dtype).contiguous(memory_format=torch.channels_last))
            results.append((y, *grads, bn.running_var))
        for name, got, want in zip(("forward", "gradient of x", "gradient of the residual", "running variance"),
                                   *results):
            problem = _difference(got, want, dtype)
            if problem:
                return f"{name}{' (two views)' if views == 2 else ''}: {problem}"
    return None


def check_cpu_kernels(device: torch.device, channels_last: bool, strict: bool = False,
                      dtypes: Sequence[torch.dtype] = (torch.float32,),
                      backend: dispatch.KernelBackend = dispatch.BACKEND) -> dict[str, str]:
    """``{"batch_norm_act": path}``: the fused CPU operator of the ResNet trunks (lcr_fast.kernels.batch_norm_act),
    built here (C++, once per machine) and compared with its plain path in each of ``dtypes``. A failed build or
    a mismatch switches it off on ``backend`` with one warning, or raises FallbackError with ``strict``."""
    op = bna.OP
    if device.type != "cpu":
        return {op: "torch (cuDNN on the GPU)"}
    if not channels_last:
        return {op: "torch (engine.channels_last=false: the fused operator takes channels_last activations)"}
    if backend.mode == "torch":
        return {op: "torch (LCR_KERNELS=torch)"}
    try:
        bna.load_operator()
        g = torch.Generator().manual_seed(0)
        problem = next((p for dtype in dtypes if (p := _batch_norm_act_problem(dtype, g))), None)
    except Exception as exc:  # a missing compiler, a failed build or load fail in many ways
        problem = _one_line(exc)
    if problem is None:
        return {op: f"cpu (C++, {torch.backends.cpu.get_cpu_capability()})"}
    return {op: _fall_back(backend, op, "the fused CPU operator", problem, strict,
                           "engine.strict forbids falling back to torch's BatchNorm and ReLU",
                           "using torch's BatchNorm and ReLU instead")}


def _run_trunks(model: nn.Module, batch: int, image_size: int, channels_last: bool, precision: str,
                device: torch.device) -> None:
    """What the first training step asks of each trunk: a forward at the micro-batch's shape and layout
    under the run's autocast, and a backward where it trains (the target's runs under no_grad). BN
    statistics are put back and no ``.grad`` is written, so the run starts as if this had not run."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device).contiguous(memory_format=layout)
    for trunk in (m for m in model.modules() if isinstance(m, ResNetTrunk)):
        saved = [b.clone() for b in trunk.buffers()]
        trainable = [p for p in trunk.parameters() if p.requires_grad]
        with torch.set_grad_enabled(bool(trainable)), eng.autocast(precision, device):
            out = trunk(x)
        if trainable:
            torch.autograd.grad(out.float().sum(), trainable)
        with torch.no_grad():
            for buffer, value in zip(trunk.buffers(), saved):
                buffer.copy_(value)


def check_compile(model: nn.Module, mode: str, batch: int, image_size: int, channels_last: bool, precision: str,
                  device: torch.device, strict: bool = False) -> str:
    """The trunks' path: ``mode`` when they compile and run (see ``_run_trunks``), "none" when
    ``mode`` is; else they are made eager again with one warning ("eager (fallback: <error>)"), or
    FallbackError is raised with ``strict``."""
    if mode == "none":
        return "none"
    try:
        _run_trunks(model, batch, image_size, channels_last, precision, device)
    except Exception as exc:  # dynamo, inductor, the C++/CUDA toolchain: failures of every kind
        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if strict:
            raise FallbackError(f"engine.compile={mode} failed ({problem}); engine.strict forbids running eagerly") \
                from exc
        eager_backbones(model)
        warnings.warn(f"engine.compile={mode} failed ({problem}); the ResNet trunks run eagerly instead")
        return f"eager (fallback: {problem})"
    return mode


@dataclass
class Components:
    """The path each component takes in this run."""

    device: str
    strict: bool
    precision: str  # what the run uses
    precision_reason: str  # why: engine.choose_precision
    kernels: dict[str, str]
    kernel_check_s: float
    data: str | None = None  # lcr_fast.data.DATA_PATHS, once the loaders exist
    compile: str | None = None  # once the model exists; None without training

    def to_dict(self) -> dict:
        precision = f"{self.precision} ({self.precision_reason})"
        return {"device": self.device, "strict": self.strict, "kernels": self.kernels,
                "kernel_check_s": round(self.kernel_check_s, 3), "data": self.data, "precision": precision,
                "compile": self.compile}

    def write(self, log_dir: str) -> str:
        """``log_dir/components.json``; returns its path."""
        path = os.path.join(log_dir, "components.json")
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, or ``cpu``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def start_checks(cfg: Config, device: torch.device, backend: dispatch.KernelBackend = dispatch.BACKEND) -> Components:
    """Precision and kernels (on ``backend``, whose mode the trainer has chosen), the checks that need the
    device alone (the data path and the compiled trunks are checked where the loaders and the model are built)."""
    strict = cfg.engine.strict
    choice = eng.choose_precision(cfg.engine.precision, device, strict)
    precision = choice.precision
    dtypes = [torch.float32]
    if device.type == "cuda" and precision in _AUTOCAST_DTYPES:
        dtypes.append(_AUTOCAST_DTYPES[precision])
    start = time.perf_counter()
    # Asking for Triton kernels by name (kernels.backend or LCR_KERNELS) is asking for no fallback.
    kernels = check_kernels(device, strict or backend.mode == "triton", dtypes, backend)
    cpu_dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cpu" and precision == "bf16" else [])
    kernels |= check_cpu_kernels(device, cfg.engine.channels_last, strict, cpu_dtypes, backend)
    return Components(describe_device(device), strict, precision, choice.reason, kernels,
                      time.perf_counter() - start)
