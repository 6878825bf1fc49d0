"""Choose between a Triton kernel and its plain-torch reference, per call, as the process's
``KernelBackend`` (``BACKEND``) says.

The mode an op sees, first match wins: a block's ``BACKEND.using(mode)`` (tests and tools that compare
paths must get the one they ask for); ``LCR_KERNELS`` (auto|triton|torch), the user's override, read at
every call so that a process may switch it between calls, as the public API allows; else the mode the
trainer chose at start-up with ``select`` from ``kernels.backend``. ``auto`` is Triton for CUDA tensors
and torch otherwise. The start-up self-check (``lcr_fast.selfcheck``) switches off, on the same object,
the Triton path of an op whose kernel fails or disagrees with its reference here. lcr-fast never writes
the variable.
"""
import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    # @triton.jit picks the interpreter when a kernel is *defined*; the op modules define theirs
    # right after importing this module, so this snapshot tells how they were built.
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except ImportError:
    HAS_TRITON = False
    INTERPRETED = False

    class _Absent:
        """Stands in for ``triton`` and ``tl`` so that kernel definitions still import without
        Triton; dispatch never launches them then."""

        def __getattr__(self, name: str) -> "_Absent":
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return self

    triton = tl = _Absent()

MODES = ("auto", "triton", "torch")
ENV_VAR = "LCR_KERNELS"


@dataclass
class GPUPlan:
    """The GPU that launch plans are made for inside ``planning_for_gpu``."""

    sm_count: int
    sm_count_read: bool = False  # a plan used sm_count: its launches depend on the GPU model


_PLAN: contextvars.ContextVar[GPUPlan | None] = contextvars.ContextVar("gpu_plan", default=None)


def _valid_mode(mode: str, source: str) -> str:
    mode = mode.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not valid; use one of {', '.join(MODES)}")
    return mode


def requested_mode(configured: str = "auto", environ: Mapping[str, str] = os.environ) -> str:
    """The mode asked for: ``LCR_KERNELS`` when it is set (it overrides the config), else ``configured``."""
    if environ.get(ENV_VAR):
        return _valid_mode(environ[ENV_VAR], ENV_VAR)
    return _valid_mode(configured, "kernels.backend")


class KernelBackend:
    """Which path each op takes: a mode, and the ops whose Triton path is switched off (with why)."""

    def __init__(self, mode: str = "auto", environ: Mapping[str, str] = os.environ):
        self._selected = _valid_mode(mode, "kernels.backend")
        self._scoped: str | None = None
        self._environ = environ
        self._disabled: dict[str, str] = {}

    @property
    def mode(self) -> str:
        """The mode now: the enclosing ``using`` block's, else ``LCR_KERNELS``, else the selected one."""
        if self._scoped is not None:
            return self._scoped
        return requested_mode(self._selected, self._environ)

    def select(self, mode: str) -> None:
        """The mode when no ``using`` block and no ``LCR_KERNELS`` says otherwise."""
        self._selected = _valid_mode(mode, "kernels.backend")

    def disable(self, op: str, reason: str) -> None:
        """From now on, ``op`` takes its torch path (``reason`` says why)."""
        self._disabled[op] = reason

    def enable_all(self) -> None:
        """Every op may take its Triton path again (the self-check re-decides each op from scratch)."""
        self._disabled.clear()

    def disabled(self) -> dict[str, str]:
        """The ops switched off by ``disable``, with the reason of each."""
        return dict(self._disabled)

    @contextlib.contextmanager
    def using(self, mode: str | None = None) -> Iterator["KernelBackend"]:
        """Within the block, ``mode`` (if given) whatever ``LCR_KERNELS`` says; afterwards the selected and
        scoped modes and the disabled ops as they were."""
        saved = self._selected, self._scoped, dict(self._disabled)
        if mode is not None:
            self._scoped = _valid_mode(mode, "kernels.backend")
        try:
            yield self
        finally:
            self._selected, self._scoped, self._disabled = saved

    def use_triton(self, x: torch.Tensor, op: str | None = None) -> bool:
        """True when ``op`` on tensor ``x`` should run the Triton kernel."""
        # Ahead-of-time recording (planning_for_gpu) wants every kernel's launches, whatever failed here.
        mode = self.mode
        if mode == "torch" or (op in self._disabled and _PLAN.get() is None):
            return False
        if mode == "auto":
            return HAS_TRITON and x.is_cuda
        if not HAS_TRITON:
            raise RuntimeError("LCR_KERNELS=triton but triton cannot be imported")
        if not x.is_cuda and not INTERPRETED and _PLAN.get() is None:
            raise RuntimeError(
                "LCR_KERNELS=triton was given a CPU tensor: Triton runs on CPU only in its interpreter, "
                "which needs TRITON_INTERPRET=1 in the environment before triton is first imported"
            )
        return True


BACKEND = KernelBackend()


def kernel_mode() -> str:
    """The process's mode (``BACKEND.mode``)."""
    return BACKEND.mode


def use_triton(x: torch.Tensor, op: str | None = None) -> bool:
    """``BACKEND.use_triton``: what every op asks before it launches."""
    return BACKEND.use_triton(x, op)


@contextlib.contextmanager
def planning_for_gpu(sm_count: int) -> Iterator[GPUPlan]:
    """Within the block, launches are planned as on a GPU with ``sm_count`` SMs, CPU tensors' too.

    For ahead-of-time compile checks (``lcr_fast.kernel_aot``), which record a GPU's launches on a machine
    without one and intercept them: a kernel that ran so would lack the interpreter's workarounds.
    """
    token = _PLAN.set(GPUPlan(int(sm_count)))
    try:
        yield _PLAN.get()
    finally:
        _PLAN.reset(token)


def sm_count(x: torch.Tensor) -> int:
    """SMs a launch on ``x`` should fill: those of the planned GPU, of x's GPU, or 1 in the interpreter."""
    plan = _PLAN.get()
    if plan is not None:
        plan.sm_count_read = True
        return plan.sm_count
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1


def interpreted(x: torch.Tensor) -> bool:
    """True when a launch on ``x`` runs in Triton's CPU interpreter (and is not planned for a GPU)."""
    return INTERPRETED and not x.is_cuda and _PLAN.get() is None


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for NHWC-strided 4-D tensors (AMP backbones), so gradients keep their layout."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
