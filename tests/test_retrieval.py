"""retrieval_metrics against the reference's per-query loop and hand-worked examples."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lcr_fast.eval import retrieval as retrieval_module
from lcr_fast.eval import retrieval_metrics


def reference_loop(feats: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The reference protocol one query at a time; singleton queries are left out of mAP."""
    n = len(labels)
    top1, top5, aps = [], [], []
    for j in range(n):
        others = np.arange(n) != j
        sim = feats[others] @ feats[j]
        ranked = labels[others][np.argsort(sim)[::-1]]
        top1.append(ranked[0] == labels[j])
        top5.append(np.any(ranked[:5] == labels[j]))
        positives = np.flatnonzero(ranked == labels[j])
        if len(positives):
            aps.append(np.mean(np.arange(1, len(positives) + 1) / (positives + 1)))
    return {"rank1": float(np.mean(top1)), "rank5": float(np.mean(top5)), "mAP": float(np.mean(aps))}


def unit_circle(degrees: list[float]) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


@pytest.mark.parametrize(
    "n, dim, classes, chunk_size",
    [(50, 8, 5, 7), (97, 16, 10, 32), (203, 32, 60, 64), (64, 4, 3, 1000), (120, 2048, 12, 50)],
)
def test_matches_reference_loop(n: int, dim: int, classes: int, chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(n + dim)
    # float64 so that both sides rank identical similarities; random data has no exact ties.
    feats = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(classes, (n,), generator=generator)
    got = retrieval_metrics(feats, labels, chunk_size=chunk_size)
    expected = reference_loop(feats.numpy(), labels.numpy())
    assert got.keys() == expected.keys()
    for key in expected:
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_float32_and_bfloat16_features_int32_labels() -> None:
    generator = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(80, 16, generator=generator), dim=1)
    labels = torch.randint(6, (80,), generator=generator)
    got = retrieval_metrics(feats, labels.int(), chunk_size=30)
    expected = reference_loop(feats.double().numpy(), labels.numpy())
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    # Half-precision features are ranked in float32, not in their own coarse precision.
    assert retrieval_metrics(feats.bfloat16(), labels) == retrieval_metrics(feats.bfloat16().float(), labels)


def test_hand_worked_example() -> None:
    # Points on the upper half circle: similarity falls with the angle between them.
    degrees = [0, 20, 50, 95, 105, 150, 175, 162]
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 2, 1])
    # Query: ranking of the others by angle -> positive ranks -> AP
    #  0 @0   A: 1A 2B 3B 4C 5A 7B 6C  -> 1, 5 -> (1 + 2/5)/2
    #  1 @20  A: 0A 2B 3B 4C 5A 7B 6C  -> 1, 5 -> (1 + 2/5)/2
    #  2 @50  B: 1A 3B 0A 4C 5A 7B 6C  -> 2, 6 -> (1/2 + 2/6)/2
    #  3 @95  B: 4C 2B 5A 7B 1A 6C 0A  -> 2, 4 -> (1/2 + 2/4)/2
    #  4 @105 C: 3B 5A 2B 7B 6C 1A 0A  -> 5    -> 1/5
    #  5 @150 A: 7B 6C 4C 3B 2B 1A 0A  -> 6, 7 -> (1/6 + 2/7)/2   (no positive in the top 5)
    #  6 @175 C: 7B 5A 4C 3B 2B 1A 0A  -> 3    -> 1/3
    #  7 @162 B: 5A 6C 4C 3B 2B 1A 0A  -> 4, 5 -> (1/4 + 2/5)/2
    F = Fraction
    aps = [
        (1 + F(2, 5)) / 2,
        (1 + F(2, 5)) / 2,
        (F(1, 2) + F(2, 6)) / 2,
        (F(1, 2) + F(2, 4)) / 2,
        F(1, 5),
        (F(1, 6) + F(2, 7)) / 2,
        F(1, 3),
        (F(1, 4) + F(2, 5)) / 2,
    ]
    got = retrieval_metrics(unit_circle(degrees), labels, chunk_size=3)
    assert got["rank1"] == 2 / 8
    assert got["rank5"] == 7 / 8
    assert got["mAP"] == pytest.approx(float(sum(aps) / len(aps)), abs=1e-12)


def test_exact_ties_rank_lower_index_first() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    # Query 0 ties items 1 (B) and 2 (A) at 0: 1B 2A 3B -> miss, AP 1/2.
    # Query 1: 2A (1), then 0A and 3B tie at 0: 2A 0A 3B -> miss, AP 1/3.
    # Query 2 ties items 0 (A) and 3 (B) at 0: 1B 0A 3B -> miss, AP 1/2.
    # Query 3: 1B and 2A tie at 0, then 0A: 1B 2A 0A -> hit, AP 1.
    # (Ranking higher indices first would make query 0 a hit.)
    got = retrieval_metrics(feats, labels, chunk_size=2)
    assert got["rank1"] == 1 / 4
    assert got["rank5"] == 1.0  # only three others: all of them are in the "top 5"
    assert got["mAP"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1) / 4, abs=1e-12)


def test_singleton_class_is_a_miss_and_left_out_of_map() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 7])
    # Queries 0 and 1 find each other first (AP 1); query 2 has nothing to find.
    got = retrieval_metrics(feats, labels)
    assert got == {"rank1": 2 / 3, "rank5": 2 / 3, "mAP": 1.0}
    assert not any(math.isnan(v) for v in got.values())


def test_all_singletons_and_too_few_items() -> None:
    feats = unit_circle([0, 40, 90])
    assert retrieval_metrics(feats, torch.tensor([0, 1, 2])) == {"rank1": 0.0, "rank5": 0.0, "mAP": 0.0}
    with pytest.raises(ValueError):
        retrieval_metrics(feats[:1], torch.tensor([0]))


def stable_loop(feats: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The reference loop with its documented tie rule: equal similarities in dataset order."""
    n = len(labels)
    top1, top5, aps = [], [], []
    for j in range(n):
        others = np.arange(n) != j
        ranked = labels[others][np.argsort(-(feats[others] @ feats[j]), kind="stable")]
        top1.append(ranked[0] == labels[j])
        top5.append(np.any(ranked[:5] == labels[j]))
        positives = np.flatnonzero(ranked == labels[j])
        if len(positives):
            aps.append(np.mean(np.arange(1, len(positives) + 1) / (positives + 1)))
    return {"rank1": float(np.mean(top1)), "rank5": float(np.mean(top5)), "mAP": float(np.mean(aps)) if aps else 0.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000])
def test_exact_ties_duplicates_and_uneven_classes(dtype: torch.dtype, chunk_size: int) -> None:
    # Features with entries in {-1, 0, 1} over 3 dims: similarities are small integers, so ties
    # between positives and others are everywhere; add duplicated rows, a large class, singletons
    # and rows without ties, so that the counting path and the sort path share chunks.
    generator = torch.Generator().manual_seed(chunk_size)
    coarse = torch.randint(-1, 2, (40, 3), generator=generator).to(dtype)
    fine = torch.nn.functional.normalize(torch.randn(30, 16, generator=generator, dtype=dtype), dim=1)
    feats = torch.cat([torch.nn.functional.pad(coarse, (0, 13)), fine, fine[:5]])
    labels = torch.cat([torch.randint(4, (40,), generator=generator), torch.full((20,), 7), torch.arange(10, 20),
                        torch.full((5,), 7)])
    got = retrieval_metrics(feats, labels, chunk_size=chunk_size)
    expected = stable_loop(feats.double().numpy(), labels.numpy())
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_collapsed_features_rank_in_dataset_order() -> None:
    # Every item identical (a collapsed model): all similarities tie, so ranks follow the index.
    feats = torch.ones(12, 4) / 2
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    got = retrieval_metrics(feats, labels, chunk_size=5)
    expected = stable_loop(feats.double().numpy(), labels.numpy())
    assert got == pytest.approx(expected, abs=1e-12)


def test_random_data_chunking_does_not_change_results() -> None:
    generator = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(300, 64, generator=generator), dim=1)
    labels = torch.randint(30, (300,), generator=generator)
    results = [retrieval_metrics(feats, labels, chunk_size=c, max_matrix_bytes=m)
               for c in (1, 37, 300, 4096) for m in (0, 2**28)]
    for other in results[1:]:
        assert other["rank1"] == results[0]["rank1"] and other["rank5"] == results[0]["rank5"]
        assert other["mAP"] == pytest.approx(results[0]["mAP"], abs=1e-12)
    expected = stable_loop(feats.double().numpy(), labels.numpy())
    # float32 scores against float64 ones: equal unless two scores are within rounding of each other.
    assert results[0]["mAP"] == pytest.approx(expected["mAP"], abs=1e-3)


@pytest.fixture(params=["compare", "search"])
def counting(request, monkeypatch):
    """Both ways retrieval_metrics counts the items above each positive (it picks one by class size)."""
    monkeypatch.setattr(retrieval_module, "COMPARE_MAX_CLASS_SIZE", 2**62 if request.param == "compare" else 0)
    return request.param


@pytest.mark.parametrize("max_matrix_bytes", [0, 2**28], ids=["row-chunks", "symmetric"])
def test_both_counting_paths_match_the_loops(counting, max_matrix_bytes) -> None:
    generator = torch.Generator().manual_seed(5)
    feats = torch.nn.functional.normalize(torch.randn(300, 24, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(12, (300,), generator=generator)
    labels[:3] = torch.tensor([40, 41, 42])  # singletons
    got = retrieval_metrics(feats, labels, chunk_size=64, max_matrix_bytes=max_matrix_bytes)
    expected = reference_loop(feats.numpy(), labels.numpy())
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    # With exact ties everywhere (entries in {-1, 0, 1}): the sort path takes over row by row.
    coarse = torch.randint(-1, 2, (60, 4), generator=generator).float()
    labels = torch.randint(5, (60,), generator=generator)
    got = retrieval_metrics(coarse, labels, chunk_size=16, max_matrix_bytes=max_matrix_bytes)
    expected = stable_loop(coarse.double().numpy(), labels.numpy())
    assert got == pytest.approx(expected, abs=1e-12)
