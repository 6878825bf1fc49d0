"""Leave-one-out image retrieval: rank-1, rank-5 and mAP, the metrics LCR reports for MoCo runs.

The reference (``validate`` in GANPerf/LCR ``main_moco.py``) loops over queries in Python and sorts
each row on the host. Here a chunk of queries is scored, sorted and reduced at once on the features'
device, so only a ``chunk_size x N`` block ever exists.
"""
import torch
from torch import Tensor


@torch.no_grad()
def retrieval_metrics(features: Tensor, labels: Tensor, chunk_size: int = 1024) -> dict[str, float]:
    """Leave-one-out retrieval over ``features`` [N, D] with class ``labels`` [N].

    Every item queries the other N-1, ranked by dot product (pass L2-normalised features for
    cosine similarity, as the reference does). ``rank1``: the top item shares the query's label;
    ``rank5``: one of the top five does; AP: mean over the query's positives of
    (positives ranked up to and including it) / (its rank). All three are fractions in [0, 1].

    Ties: items with exactly equal similarity are ranked in dataset order (lower index first, a
    stable sort). The reference reverses numpy's default ``argsort``, which is not stable, so its
    order within a tie is unspecified; results can differ from it only where an exact tie mixes
    positives and negatives.

    Singleton classes: a query with no other member of its class counts as a miss for rank-1 and
    rank-5 (as in the reference) and is left out of the mAP mean, where the reference would divide
    by zero and report nan. If no query has a positive at all, mAP is 0.0.
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out retrieval needs at least 2 items, got {n}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if features.element_size() < 4:
        # Half-precision similarities would tie far more often than the reference's float32 ones.
        features = features.float()
    device = features.device
    labels = labels.to(device)
    hits1 = hits5 = with_positives = 0
    ap_sum = 0.0
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        rows = torch.arange(stop - start, device=device)
        sim = features[start:stop] @ features.T
        # The query itself sinks to the last place and is then cut off.
        sim[rows, rows + start] = -torch.inf
        order = sim.sort(dim=1, descending=True, stable=True).indices[:, : n - 1]
        del sim
        hit = labels[order] == labels[start:stop, None]
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit[:, :5].any(dim=1).sum())
        # Positives are about one in (number of classes): work on them alone, not on every rank.
        # nonzero lists each query's positives in rank order, so the j-th of a query has j found.
        query, rank0 = hit.nonzero(as_tuple=True)
        positives = torch.bincount(query, minlength=stop - start)
        first = positives.cumsum(0) - positives
        found = torch.arange(query.shape[0], device=device) - first[query] + 1
        # float64, as the reference accumulates Python floats.
        precision = found.double() / (rank0 + 1).double()
        ap = torch.zeros(stop - start, dtype=torch.float64, device=device).index_add_(0, query, precision)
        ap_sum += float((ap / positives.clamp(min=1)).sum())
        with_positives += int((positives > 0).sum())
    return {
        "rank1": hits1 / n,
        "rank5": hits5 / n,
        "mAP": ap_sum / with_positives if with_positives else 0.0,
    }
