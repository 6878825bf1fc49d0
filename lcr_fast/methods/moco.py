"""MoCo v2 + LCR (GANPerf/LCR ``main_moco.py``, ``moco/builder.py``): its declaration.

The model is ``lcr_fast.models.moco.MoCo``. Its queue takes whole global batches (the reference
asserts it on the first step), checked with the config. The reference runs no linear evaluation after
training; lcr-eval's linear protocol defaults to ``cached`` (seconds; ``reference`` is main_lincls.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from .base import ConfigKeys, Method, ReferenceLayout


def queue_size_error(K: Any, global_batch: int) -> str | None:
    """Why a queue of ``K`` keys cannot be refilled one global batch at a time, None when it can."""
    if K >= global_batch and K % global_batch == 0:
        return None
    below = max(1, K // global_batch)
    sizes = sorted({global_batch * n for n in range(max(1, below - 1), below + 3)})
    return (f"model.moco_k={K!r} is not a multiple of the global batch train.batch_size={global_batch}: the queue is "
            f"refilled one global batch at a time. Nearby valid sizes: {', '.join(map(str, sizes))}")


def reference_config(state: Mapping[str, Any], shape: Callable[[str], tuple]) -> dict:
    """A model of the file's shapes: the torchvision ResNet the query encoder's tensors fit (``main_moco.py``'s
    ``--arch``; ResNet-50 when none does, so that loading names the keys that differ), with the stem max-pool,
    head, queue."""
    from lcr_fast.models.backbone import infer_arch  # declarations import no torch at import time

    backbone = infer_arch({k[len("encoder_q."):]: v for k, v in state.items() if k.startswith("encoder_q.")})
    backbone = backbone or "resnet50"
    mlp = "encoder_q.fc.0.weight" in state
    K = int(shape("queue")[1])
    return {
        "model": {"name": "moco", "backbone": backbone, "maxpool": True, "pretrained": "none", "moco_mlp": mlp,
                  "moco_dim": int(shape("encoder_q.fc.2.weight" if mlp else "encoder_q.fc.weight")[0]),
                  "moco_k": K, "rationale_channels": int(shape("conv16.weight")[0])},
        # The file does not tell the batch that filled its queue: the largest part of the reference's
        # 128 that the queue takes whole, so that the config is one training could continue from.
        "train": {"batch_size": math.gcd(K, 128)},
    }


# ``main_moco.py`` saves ``{'epoch', 'arch', 'state_dict', 'optimizer'}`` from its DDP module (keys
# ``module.``-prefixed); ``encoder_q``/``encoder_k`` (``.fc`` the head) are our backbone/projector and
# key_backbone/key_projector. Its unused "max" branch is set aside on reading and written back on export
# (lcr_fast.compat). Order matters: ``encoder_q.fc.`` before ``encoder_q.``, ``queue_ptr`` before ``queue``.
METHOD = Method(
    name="moco",
    summary="MoCo v2: query encoder against a momentum key encoder and a queue of keys (main_moco.py)",
    model="lcr_fast.models.moco:MoCo",
    recipe="mocov2",
    keys=ConfigKeys(
        # the reference's main_moco.py --moco-dim/-k/-m/-t and --mlp; moco_k a multiple of train.batch_size
        {"moco_dim": 256, "moco_k": 65536, "moco_m": 0.999, "moco_t": 0.2, "moco_mlp": True},
        integers=("moco_dim", "moco_k"), fractions=("moco_m",), positives=("moco_t",), flags=("moco_mlp",)),
    linear_protocol="cached",
    paper_model={"name": "moco", "backbone": "resnet50", "maxpool": True, "pretrained": "none"},  # layer4 7x7
    final_linear_eval="the reference's MoCo (main_moco.py) runs no linear evaluation after training; "
                      "lcr-eval --protocol linear --linear_protocol reference runs its main_lincls.py",
    reference=ReferenceLayout(
        prefixes=(("projector.", ("encoder_q.fc.",)),
                  ("backbone.", ("encoder_q.",)),
                  ("key_projector.", ("encoder_k.fc.",)),
                  ("key_backbone.", ("encoder_k.",)),
                  ("rationale.conv.", ("conv16.",)),
                  ("rationale.bn.", ("bn16.",)),
                  ("queue_ptr", ("queue_ptr",)),
                  ("queue", ("queue",))),
        signature="encoder_q.",
        config_for=reference_config,
        unused=("queue_max", "queue_ptr_max", "fc.", "qmax.", "kmax.", "conv16_2.", "bn16_2."),
        extra_state="lcr_fast.compat:moco_unused_state",
        file="lcr_fast.compat:moco_reference_file",
    ),
    batch_error=lambda model, global_batch: queue_size_error(model["moco_k"], global_batch),
)
