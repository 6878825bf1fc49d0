"""Feature extraction over a loader, and the evaluation the trainer runs (kNN monitor, retrieval)."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .knn import knn_accuracy
from .numerics import EvalNumerics
from .retrieval import retrieval_metrics


@torch.no_grad()
def extract_features(model: nn.Module, loader, keys: tuple[str, ...] = ("gap", "rationale"), progress: bool = False,
                     desc: str = "features",
                     numerics: EvalNumerics | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``model.extract`` over ``loader`` in eval mode; returns ({key: [N, D]}, labels [N]).

    ``numerics``: the precision and layout to compute in (default fp32, contiguous). The model is put back
    into the mode it was in, so a call in the middle of training changes nothing.
    """
    numerics = numerics or EvalNumerics()
    was_training = model.training
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    labels = []
    try:
        for images, target in tqdm(loader, desc=desc, leave=False, disable=not progress):
            out = numerics.extract(model, images)
            for k in keys:
                feats[k].append(out[k].float())
            labels.append(target)
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def evaluate(model: nn.Module, memory_loader, test_loader, k: int = 200, t: float = 0.1, retrieval: bool = True,
             progress: bool = False, numerics: EvalNumerics | None = None, val_loader=None) -> dict:
    """kNN accuracy (GAP features, train split as the bank; the reference's monitor) and, with
    ``retrieval``, leave-one-out retrieval on the test split with rationale features (the reference's
    protocol) and with GAP features for comparison. With ``val_loader`` (images held out of the
    training split), "validation" holds its kNN accuracy against the same bank and its leave-one-out
    retrieval among themselves (rationale features): the figures a model is selected by."""
    test_feats, test_labels = extract_features(model, test_loader, progress=progress, desc="test features",
                                               numerics=numerics)
    bank_feats, bank_labels = extract_features(model, memory_loader, keys=("gap",), progress=progress,
                                               desc="train features", numerics=numerics)
    num_classes = len(test_loader.classes)
    results = {"knn_top1": knn_accuracy(bank_feats["gap"], bank_labels, test_feats["gap"], test_labels, k=k, t=t,
                                        num_classes=num_classes)}
    if retrieval:
        results["retrieval"] = retrieval_metrics(test_feats["rationale"], test_labels)
        results["retrieval_gap"] = retrieval_metrics(test_feats["gap"], test_labels)
    if val_loader is not None:
        val_feats, val_labels = extract_features(model, val_loader, progress=progress, desc="validation features",
                                                 numerics=numerics)
        results["validation"] = {
            "knn_top1": knn_accuracy(bank_feats["gap"], bank_labels, val_feats["gap"], val_labels, k=k, t=t,
                                     num_classes=num_classes),
            **retrieval_metrics(val_feats["rationale"], val_labels)}
    return results

