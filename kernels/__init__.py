"""Fused Triton kernels of LCR (installed as ``lcr_fast.kernels``).

Every op dispatches on ``LCR_KERNELS`` (auto|triton|torch, read per call) between its Triton
kernel and a plain-torch reference ``<op>_torch`` of the same math.
"""
from .byol_loss import byol_loss, byol_loss_torch
from .dispatch import HAS_TRITON, kernel_mode, use_triton
from .ema import ema_update
from .gradcam import gradcam, gradcam_torch
from .infonce import infonce_queue, infonce_queue_torch
from .rationale_kl import rationale_kl, rationale_kl_torch
from .rationale_map import rationale_map, rationale_map_torch
from .rationale_pool import rationale_pool, rationale_pool_torch

__all__ = [
    "HAS_TRITON", "kernel_mode", "use_triton",
    "byol_loss", "byol_loss_torch", "ema_update", "gradcam", "gradcam_torch",
    "infonce_queue", "infonce_queue_torch", "rationale_kl", "rationale_kl_torch",
    "rationale_map", "rationale_map_torch", "rationale_pool", "rationale_pool_torch",
]
