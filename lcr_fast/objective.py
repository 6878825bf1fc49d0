"""The LCR training objective, defined once: the models' ``loss``, the trainer's backward and the
logged losses all come from here.

The reference runs one process over the whole batch: its SSL loss is a mean over samples and its
rationale KL a sum over them (reduction ``sum``). A DeepSpeed step is split into ``pieces`` = ranks x
accumulated micro-batches; the engine averages the pieces' gradients, which keeps a mean a mean but
turns a sum into a mean, so each piece's KL weighs ``pieces`` times as much as in one process.
"""
from __future__ import annotations

from typing import TypeVar

import torch

Loss = TypeVar("Loss", torch.Tensor, float)


def lcr_objective(ssl_loss: Loss, rationale_loss: Loss, rationale_weight: float, pieces: int = 1) -> Loss:
    """What one piece of a step back-propagates: L_ssl + weight * pieces * KL (``pieces`` 1: one process)."""
    return ssl_loss + (rationale_weight * pieces) * rationale_loss


def global_batch_losses(mean_terms: torch.Tensor, rationale_weight: float, pieces: int) -> dict[str, float]:
    """The losses of the whole global batch as the reference's single process reports them, from the
    mean over the ``pieces`` of (ssl_loss, rationale_loss) (a host sync: log steps only)."""
    ssl, kl = mean_terms.tolist()
    kl *= pieces
    return {"loss": lcr_objective(ssl, kl, rationale_weight), "ssl_loss": ssl, "rationale_loss": kl}
