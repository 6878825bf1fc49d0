"""Choose between a Triton kernel and its plain-torch reference, per call.

``LCR_KERNELS`` is read at every call (not at import) so that tests and users can switch backends
without re-importing: ``auto`` (Triton for CUDA tensors, torch otherwise), ``triton`` or ``torch``.
"""
import os

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


def kernel_mode() -> str:
    mode = os.environ.get("LCR_KERNELS", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"LCR_KERNELS={mode!r} is not valid; use one of {', '.join(MODES)}")
    return mode


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on tensor ``x`` should run the Triton kernel."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "auto":
        return HAS_TRITON and x.is_cuda
    if not HAS_TRITON:
        raise RuntimeError("LCR_KERNELS=triton but triton cannot be imported")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "LCR_KERNELS=triton was given a CPU tensor: Triton runs on CPU only in its interpreter, "
            "which needs TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    return True


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for NHWC-strided 4-D tensors (AMP backbones), so gradients keep their layout."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
