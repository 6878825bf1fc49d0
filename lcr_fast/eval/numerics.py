"""How an evaluation computes: the precision and the memory layout of the run whose model it evaluates.

The trainer's evaluations, ``train.py --eval_from`` and ``lcr-eval`` on a checkpoint all extract features
through one :class:`EvalNumerics` built from the run's config, so that re-evaluating a checkpoint gives the
run's own figures. The layout belongs here as much as the precision: under bf16 a channels_last and a
contiguous convolution round differently (a checkpoint's rationale features differed by 4e-3 at a scale of
0.17, enough to move a retrieval mAP by 0.005), while in fp32 they differ by about 5e-7.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lcr_fast import engine as eng


@dataclass(frozen=True)
class EvalNumerics:
    """The precision (``engine.choose_precision``'s answer) and the input layout features are extracted in.

    The input alone decides the layout: a convolution on a channels_last input runs channels_last whether its
    weight is channels_last (the trainer's model) or contiguous (a loaded checkpoint), bit for bit the same.
    """

    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def of_run(cls, cfg, device: torch.device | str, precision: str | None = None) -> EvalNumerics:
        """A run's: ``precision`` as the run resolved it, else ``cfg.engine.precision`` resolved on ``device``."""
        chosen = precision or eng.resolve_precision(cfg.engine.precision, torch.device(device))
        return cls(chosen, bool(cfg.engine.channels_last))

    def extract(self, model: nn.Module, images: Tensor) -> dict[str, Tensor]:
        """``model.extract(images)`` on the images' device in this precision and layout (no grad is the
        caller's choice)."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with eng.autocast(self.precision, images.device):
            return model.extract(images.contiguous(memory_format=layout))
