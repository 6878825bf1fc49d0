"""SimSiam + LCR (Chen & He, CVPR 2021; facebookresearch/simsiam ``main_simsiam.py``): its declaration.

The model is ``lcr_fast.models.simsiam.SimSiam``: one encoder for both views, no momentum encoder, the
loss -(cos(p1, z2) + cos(p2, z1)) / 2 with z detached, and LCR's branch as BYOL's (GradCAM of that loss
on view 1's layer4, the flattened KL at ``model.rationale_temperature``). It trains with MoCo v2's
augmentation and, with ``--fix-pred-lr`` as the SimSiam README runs it, keeps the predictor at the base
rate. LCR's reference has no SimSiam, so there is no reference checkpoint layout and no linear
evaluation after training (main_simsiam.py runs none either); lcr-eval defaults to the cached probe.
"""
from __future__ import annotations

from .base import ConfigKeys, Method

METHOD = Method(
    name="simsiam",
    summary="SimSiam: one encoder, a predictor and a stop-gradient, no momentum encoder (main_simsiam.py)",
    model="lcr_fast.models.simsiam:SimSiam",
    recipe="mocov2",
    # builder.py's dim (the projector's output) and pred_dim (the predictor's hidden width)
    keys=ConfigKeys({"simsiam_dim": 2048, "simsiam_pred_dim": 512}, integers=("simsiam_dim", "simsiam_pred_dim")),
    linear_protocol="cached",
    paper_model={"name": "simsiam", "backbone": "resnet50", "maxpool": True, "pretrained": "none"},
    final_linear_eval="SimSiam's main_simsiam.py runs no linear evaluation after training; "
                      "lcr-eval --protocol linear runs one on the checkpoint",
    fixed_lr=("predictor.",),  # main_simsiam.py --fix-pred-lr
)
