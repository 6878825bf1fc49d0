"""BYOL + LCR, the reference's main method (GANPerf/LCR ``main.py``, ``models/byol.py``): its declaration.

The model is ``lcr_fast.models.byol.BYOL``. After training the reference runs its linear evaluation
(``linear_cub_eval.py``), and so does the trainer; lcr-eval's linear protocol defaults to that one.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .base import ConfigKeys, Method, ReferenceLayout


def reference_config(state: Mapping[str, Any], shape: Callable[[str], tuple]) -> dict:
    """A model of the file's shapes: ResNet-50 without the stem max-pool (the reference's) or the torchvision
    ResNet the backbone's tensors fit (with its max-pool), head sizes."""
    from lcr_fast.models.backbone import infer_arch  # declarations import no torch at import time

    arch = infer_arch({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    backbone = "resnet50_cub200" if arch in (None, "resnet50") else arch
    return {"model": {"name": "byol", "backbone": backbone, "pretrained": "none",
                      "proj_hidden_dim": int(shape("projector.layer1.0.weight")[0]),
                      "proj_dim": int(shape("projector.layer2.weight")[0]),
                      "rationale_channels": int(shape("conv16.weight")[0])}}


# The reference's BYOL module registers the backbone and projector twice (``backbone.*`` and
# ``online_encoder.0.*`` are one tensor), names the EMA target ``target_encoder.{0,1}`` and the rationale
# detector ``conv16``/``bn16``; it saves ``{'epoch', 'state_dict'}``.
METHOD = Method(
    name="byol",
    summary="BYOL: online network with a predictor against an EMA target (the reference's main.py)",
    model="lcr_fast.models.byol:BYOL",
    recipe="byol",
    keys=ConfigKeys({"proj_hidden_dim": 4096, "proj_dim": 256, "ema_tau": 0.996},
                    integers=("proj_hidden_dim", "proj_dim"), fractions=("ema_tau",)),
    linear_protocol="lcr",
    paper_model={"name": "byol", "backbone": "resnet50_cub200", "pretrained": "none"},  # layer4 14x14 at 224 px
    fixed_lr=("predictor.",),  # the reference's SGD: the predictor's group stays at the base rate
    reference=ReferenceLayout(
        prefixes=(("backbone.", ("backbone.", "online_encoder.0.")),
                  ("projector.", ("projector.", "online_encoder.1.")),
                  ("predictor.", ("online_predictor.",)),
                  ("target_backbone.", ("target_encoder.0.",)),
                  ("target_projector.", ("target_encoder.1.",)),
                  ("rationale.conv.", ("conv16.",)),
                  ("rationale.bn.", ("bn16.",))),
        signature="online_predictor.",
        config_for=reference_config,
    ),
)
