"""Fused Triton kernels of LCR (installed as ``lcr_fast.kernels``).

Every op dispatches between its Triton kernel and a plain-torch reference ``<op>_torch`` of the
same math as the process's ``BACKEND`` says (``dispatch.KernelBackend``: its mode, from a ``using``
block, ``LCR_KERNELS`` read at each call, or ``kernels.backend``, and the ops the start-up self-check
switched off).
"""
from .batch_norm_act import batch_norm_act, batch_norm_act_torch
from .byol_loss import byol_loss, byol_loss_torch
from .dispatch import BACKEND, HAS_TRITON, KernelBackend, kernel_mode, use_triton
from .ema import ema_update
from .gradcam import gradcam, gradcam_torch
from .infonce import infonce_queue, infonce_queue_torch
from .rationale_kl import rationale_kl, rationale_kl_torch
from .rationale_map import rationale_map, rationale_map_torch
from .rationale_pool import rationale_pool, rationale_pool_torch

__all__ = [
    "BACKEND", "HAS_TRITON", "KernelBackend", "kernel_mode", "use_triton",
    "batch_norm_act", "batch_norm_act_torch", "byol_loss", "byol_loss_torch", "ema_update", "gradcam", "gradcam_torch",
    "infonce_queue", "infonce_queue_torch", "rationale_kl", "rationale_kl_torch",
    "rationale_map", "rationale_map_torch", "rationale_pool", "rationale_pool_torch",
]
