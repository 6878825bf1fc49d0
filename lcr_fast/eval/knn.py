"""Weighted kNN classification on frozen features: the monitor the reference runs during BYOL training.

Same rule as GANPerf/LCR ``tools/knn_monitor.py`` (InstDisc's weighted kNN): each of the k most
similar bank items votes for its label with weight exp(similarity / t).
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(
    feature: Tensor, feature_bank: Tensor, feature_labels: Tensor, classes: int, k: int, t: float
) -> Tensor:
    """Class ranking [B, classes], best first, for queries ``feature`` [B, D].

    ``feature_bank`` is [D, N] (transposed, as the reference keeps it) and ``feature_labels`` [N].
    Classes with equal scores are ordered by class index (stable sort).
    """
    sim_weight, sim_indices = (feature @ feature_bank).topk(k=k, dim=-1)
    sim_labels = feature_labels[sim_indices].long()
    # Summing votes per class with scatter_add gives the reference's one-hot product without its
    # [B*k, classes] temporary.
    scores = torch.zeros(feature.shape[0], classes, dtype=sim_weight.dtype, device=feature.device)
    scores.scatter_add_(1, sim_labels, (sim_weight / t).exp())
    return scores.argsort(dim=-1, descending=True, stable=True)


@torch.no_grad()
def knn_accuracy(
    bank_feats: Tensor,
    bank_labels: Tensor,
    feats: Tensor,
    labels: Tensor,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in percent of weighted kNN (k neighbours, temperature t) from a feature bank.

    Both feature sets are L2-normalised here. ``k`` is capped at the bank size; ``num_classes``
    defaults to one more than the largest label seen. Queries go in chunks of ``chunk_size`` so
    that only a ``chunk_size x N_bank`` similarity block exists at a time.
    """
    device = bank_feats.device
    bank = F.normalize(bank_feats, dim=1).T.contiguous()
    bank_labels = bank_labels.to(device)
    feats = F.normalize(feats.to(device), dim=1)
    labels = labels.to(device)
    if num_classes is None:
        num_classes = int(torch.cat([bank_labels, labels]).max()) + 1
    k = min(k, bank.shape[1])
    correct = 0
    for start in range(0, feats.shape[0], chunk_size):
        pred = knn_predict(feats[start : start + chunk_size], bank, bank_labels, num_classes, k, t)
        correct += int((pred[:, 0] == labels[start : start + chunk_size]).sum())
    return correct / feats.shape[0] * 100
