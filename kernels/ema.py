"""EMA of the target / key encoder: target = tau * target + (1 - tau) * source, in place.

Kept on torch._foreach_*: one fused Triton pass would move ~3 bytes per parameter byte instead of
~7, a saving too small next to a step to pay for a list-of-pointers kernel. The two foreach calls
round exactly like the reference's ``tau * t + (1 - tau) * s`` (each product rounded, then the
sum), which torch._foreach_add_(alpha=...) or lerp would not.
"""
import torch


def ema_update(targets: list[torch.Tensor], sources: list[torch.Tensor], tau: float) -> None:
    """In place: every ``targets[i] = tau * targets[i] + (1 - tau) * sources[i]``."""
    if len(targets) != len(sources):
        raise ValueError(f"ema_update got {len(targets)} targets but {len(sources)} sources")
    if not targets:
        return
    with torch.no_grad():
        torch._foreach_mul_(targets, tau)
        torch._foreach_add_(targets, torch._foreach_mul(sources, 1.0 - tau))
