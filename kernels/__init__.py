"""Fused Triton kernels of LCR (installed as ``lcr_fast.kernels``)."""
