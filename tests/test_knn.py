"""Weighted kNN against a plain per-query computation and a hand-worked example."""
import math

import numpy as np
import pytest
import torch

from lcr_fast.eval import knn_accuracy, knn_predict


def plain_knn_accuracy(
    bank: np.ndarray, bank_labels: np.ndarray, feats: np.ndarray, labels: np.ndarray, k: int, t: float
) -> float:
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    correct = 0
    for query, label in zip(feats, labels):
        sim = bank @ query
        votes: dict[int, float] = {}
        for i in np.argsort(-sim)[:k]:
            votes[bank_labels[i]] = votes.get(bank_labels[i], 0.0) + math.exp(sim[i] / t)
        correct += max(votes, key=votes.get) == label
    return correct / len(labels) * 100


@pytest.mark.parametrize(
    "n_bank, n_query, dim, classes, k, chunk_size", [(300, 70, 16, 7, 20, 32), (150, 40, 8, 12, 200, 1024)]
)
def test_matches_plain_computation(
    n_bank: int, n_query: int, dim: int, classes: int, k: int, chunk_size: int
) -> None:
    generator = torch.Generator().manual_seed(n_bank)
    centers = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    bank_labels = torch.randint(classes, (n_bank,), generator=generator)
    labels = torch.randint(classes, (n_query,), generator=generator)
    # Unnormalised, overlapping clusters: accuracy is neither 0 nor 100.
    bank = centers[bank_labels] + 1.5 * torch.randn(n_bank, dim, generator=generator, dtype=torch.float64)
    feats = centers[labels] + 1.5 * torch.randn(n_query, dim, generator=generator, dtype=torch.float64)
    got = knn_accuracy(bank, bank_labels, feats, labels, k=k, t=0.1, chunk_size=chunk_size)
    expected = plain_knn_accuracy(
        bank.numpy(), bank_labels.numpy(), feats.numpy(), labels.numpy(), min(k, n_bank), 0.1
    )
    assert 0 < expected < 100
    assert got == pytest.approx(expected, abs=1e-9)


# One close neighbour of class 0 against two farther ones of class 1, and one opposite of class 2.
BANK = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
BANK_LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([[1.0, 0.0]])


def test_hand_example_temperature_decides() -> None:
    # k=3 keeps similarities 1 (class 0), 0.6 and 0.6 (class 1).
    # t=0.1: class 0 scores e^10 = 22026, class 1 scores 2 e^6 = 807 -> class 0.
    # t=10:  class 0 scores e^0.1 = 1.105, class 1 scores 2 e^0.06 = 2.124 -> class 1.
    assert knn_predict(QUERY, BANK.T, BANK_LABELS, 3, 3, 0.1).tolist() == [[0, 1, 2]]
    assert knn_predict(QUERY, BANK.T, BANK_LABELS, 3, 3, 10.0).tolist() == [[1, 0, 2]]
    label = torch.tensor([0])
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, label, k=3, t=0.1) == 100.0
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, label, k=3, t=10.0) == 0.0
    # Features are normalised inside: shrinking the class-0 neighbour would otherwise hand the vote to class 1.
    scaled_bank = BANK * torch.tensor([[0.1], [3.0], [3.0], [1.0]])
    assert knn_accuracy(scaled_bank, BANK_LABELS, 0.5 * QUERY, label, k=3, t=0.1) == 100.0


def test_k_larger_than_bank_uses_the_whole_bank() -> None:
    # All four vote at t=10: class 0 e^0.1 = 1.105, class 1 2.124, class 2 e^-0.1 = 0.905.
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, torch.tensor([1]), k=200, t=10.0) == 100.0
    # A random bank of 12: k=200 behaves as k=12.
    generator = torch.Generator().manual_seed(3)
    bank, feats = torch.randn(12, 5, generator=generator), torch.randn(30, 5, generator=generator)
    bank_labels, labels = torch.randint(3, (12,), generator=generator), torch.randint(3, (30,), generator=generator)
    assert knn_accuracy(bank, bank_labels, feats, labels, k=200) == knn_accuracy(bank, bank_labels, feats, labels, k=12)
    assert knn_accuracy(bank, bank_labels, feats, labels, k=200) == pytest.approx(
        plain_knn_accuracy(bank.double().numpy(), bank_labels.numpy(), feats.double().numpy(), labels.numpy(), 12, 0.1)
    )
