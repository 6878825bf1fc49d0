"""Leave-one-out image retrieval: rank-1, rank-5 and mAP, the metrics LCR reports for MoCo runs.

The reference (``validate`` in GANPerf/LCR ``main_moco.py``) loops over queries in Python and sorts
each row on the host. Here a chunk of queries is scored and reduced at once on the features'
device (the scores of all N x N pairs are computed as half a product and a mirror while they fit in
a memory budget, else ``chunk_size`` rows at a time), and no row is sorted: a query needs only
the ranks of its few positives (about N / classes), and a positive's rank is the number of items
scoring more than it. Those are counted with one comparison pass over the row per positive (small
classes) or by placing every item among the query's sorted positive scores (``searchsorted``) and
summing a histogram of the positions (large classes); rank-1 and rank-5 follow from the best
positive's rank. Rows where another item scores exactly as much as a positive (where the tie rule
decides the order) take the stable sort instead, so the results are those of the sort in every case.
"""
import torch
from torch import Tensor


def _class_members(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(table [classes, largest class] of item indices padded with -1, row of that table for each item)."""
    _, group, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.sort(group, stable=True).indices
    starts = counts.cumsum(0) - counts
    slot = torch.arange(labels.shape[0], device=labels.device) - starts[group[order]]
    table = torch.full((counts.shape[0], int(counts.max())), -1, dtype=torch.long, device=labels.device)
    table[group[order], slot] = order
    return table, group


# Largest class (so at most one fewer positives per query) up to which the items above each positive
# are counted by one comparison pass per positive; beyond it, by one binary search per item among the
# positives, whose cost grows only as the log of the class size. On a 2-core CPU at N=1000 the two
# cost the same at ~150 positives per query (CUB, Cars, Aircraft test classes hold 30-50 images).
COMPARE_MAX_CLASS_SIZE = 128


def _count_by_comparing(sim: Tensor, positive_scores: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """(items scoring more than each positive slot [B, S], rows where a non-positive ties a positive [B])."""
    b, s = positive_scores.shape[0], positive_scores.shape[1] - 1
    # The masks are written as 0.0 / 1.0 floats and summed as such (exact for counts below 2**24 in
    # float32): on a CPU that beats a bool mask, which a sum first widens to integers.
    dtype = sim.dtype if sim.shape[1] < 2**24 else torch.float64
    greater = torch.zeros(b, s, dtype=dtype, device=sim.device)
    equal = torch.zeros(b, s, dtype=dtype, device=sim.device)
    mask = torch.empty(sim.shape, dtype=dtype, device=sim.device)
    for a in range(int(positives.max())):
        threshold = positive_scores[:, a : a + 1]
        greater[:, a] = torch.gt(sim, threshold, out=mask).sum(dim=1)
        equal[:, a] = torch.eq(sim, threshold, out=mask).sum(dim=1)
    greater, equal = greater.long(), equal.long()
    # Each positive equals itself and any positive of the same score; more is a tie with another item.
    same = (torch.searchsorted(positive_scores, positive_scores[:, :s].contiguous(), right=True)
            - torch.searchsorted(positive_scores, positive_scores[:, :s].contiguous()))
    slot = torch.arange(s, device=sim.device)
    tie_rows = ((equal > same) & (slot < positives[:, None])).any(dim=1)
    return greater, tie_rows


def _count_by_searching(sim: Tensor, positive_scores: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """As ``_count_by_comparing``, by placing each item among the sorted positive scores."""
    b, s = positive_scores.shape[0], positive_scores.shape[1] - 1
    # below[q, k]: how many of q's positives score strictly less than item k.
    below = torch.searchsorted(positive_scores, sim)
    # Each positive matches its own score; any further match is another item tying a positive.
    tie_rows = (positive_scores.gather(1, below) == sim).sum(dim=1) > positives
    hist = torch.zeros(b, s + 1, dtype=torch.long, device=sim.device)
    hist.scatter_add_(1, below, torch.ones((1, 1), dtype=torch.long, device=sim.device).expand_as(below))
    # greater[q, a] = #{k: below[q, k] > a}.
    greater = hist.sum(dim=1, keepdim=True) - hist.cumsum(dim=1)
    return greater[:, :s], tie_rows


# Rows per block of the symmetric product: large enough for an efficient matrix product, small enough
# that the blocks below the diagonal (mirrored, not computed) are most of the lower half.
SYMMETRIC_BLOCK = 256


def _symmetric_similarity(features: Tensor) -> Tensor:
    """features @ features.T from the blocks on and above the diagonal; those below are their mirror."""
    n = features.shape[0]
    sim = torch.empty(n, n, dtype=features.dtype, device=features.device)
    edges = list(range(0, n, SYMMETRIC_BLOCK)) + [n]
    for start, stop in zip(edges[:-1], edges[1:]):
        torch.mm(features[start:stop], features[start:].T, out=sim[start:stop, start:])
        sim[stop:, start:stop] = sim[start:stop, stop:].T
    return sim


def _sorted_rows(sim: Tensor, hit: Tensor) -> tuple[int, int, float, int]:
    """(rank-1 hits, rank-5 hits, sum of AP, queries with a positive) of full rows by a stable sort.

    ``sim`` [B, N] has -inf at each query's own column; ``hit`` [B, N] marks its positives.
    """
    order = sim.sort(dim=1, descending=True, stable=True).indices[:, : sim.shape[1] - 1]
    hit = hit.gather(1, order)
    b = sim.shape[0]
    # nonzero lists each query's positives in rank order, so the j-th of a query has j found.
    query, rank0 = hit.nonzero(as_tuple=True)
    positives = torch.bincount(query, minlength=b)
    first = positives.cumsum(0) - positives
    found = torch.arange(query.shape[0], device=sim.device) - first[query] + 1
    # float64, as the reference accumulates Python floats.
    precision = found.double() / (rank0 + 1).double()
    ap = torch.zeros(b, dtype=torch.float64, device=sim.device).index_add_(0, query, precision)
    return (int(hit[:, 0].sum()), int(hit[:, :5].any(dim=1).sum()), float((ap / positives.clamp(min=1)).sum()),
            int((positives > 0).sum()))


def _score_chunk(sim: Tensor, start: int, labels: Tensor, table: Tensor, group: Tensor,
                 inf_column: Tensor) -> tuple[int, int, float, int]:
    """(rank-1 hits, rank-5 hits, AP sum, queries with a positive) of the queries ``start`` onwards
    whose similarities to every item are the rows of ``sim`` (overwritten)."""
    device = sim.device
    b, s = sim.shape[0], table.shape[1]  # slots per query: its class's members, itself included (masked)
    rows = torch.arange(b, device=device)
    query = rows + start
    # The query itself sinks to the last place (and is never counted as ranked before anything).
    sim[rows, query] = -torch.inf

    # The query's positives: its class's members other than itself. Empty slots point at the
    # query itself and score +inf, as does one extra slot, so no finite score lies above them.
    members = table[group[start:start + b]]
    valid = (members >= 0) & (members != query[:, None])
    members = torch.where(valid, members, query[:, None])
    positive_scores = torch.cat([sim.gather(1, members).masked_fill_(~valid, torch.inf), inf_column[:b]], dim=1)
    positive_scores = positive_scores.sort(dim=1).values
    positives = valid.sum(dim=1)
    slot = torch.arange(s, device=device)
    is_positive = slot < positives[:, None]  # sorted: the positives fill the first slots

    # How many items score more than each positive (the query itself scores -inf: never), and
    # whether an item other than the positives scores exactly as much as one of them; there the
    # tie rule (index order) decides, so such rows take the stable sort. Rare with real-valued
    # features (duplicate images, a collapsed model).
    count = _count_by_comparing if s <= COMPARE_MAX_CLASS_SIZE else _count_by_searching
    greater, tie_rows = count(sim, positive_scores, positives)
    # Positives of equal score: the lower ascending slot is ranked after the higher ones.
    tied_above = torch.searchsorted(positive_scores, positive_scores[:, :s].contiguous(), right=True) - 1 - slot
    rank0 = greater + tied_above
    # Ascending slot a of a query with P positives is its (P - a)-th best positive.
    found = positives[:, None] - slot
    precision = torch.where(is_positive, found.double() / (rank0 + 1).double(), 0.0)
    ap = precision.sum(dim=1) / positives.clamp(min=1)
    best = rank0.gather(1, (positives - 1).clamp(min=0)[:, None])[:, 0]
    fast = ~tie_rows & (positives > 0)
    counts = (int((fast & (best == 0)).sum()), int((fast & (best < 5)).sum()), float(ap[fast].sum()),
              int(fast.sum()))
    if bool(tie_rows.any()):
        hit = labels[None, :] == labels[start:start + b, None]
        hit[rows, query] = False
        counts = tuple(mine + tied for mine, tied in zip(counts, _sorted_rows(sim[tie_rows], hit[tie_rows])))
    return counts


@torch.no_grad()
def retrieval_metrics(features: Tensor, labels: Tensor, chunk_size: int = 1024,
                      max_matrix_bytes: int = 2**28) -> dict[str, float]:
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

    Memory: the similarity matrix is symmetric, so when all N x N scores fit in ``max_matrix_bytes``
    (256 MiB: N up to 8,192 in float32) only the blocks on and above the diagonal are multiplied and
    the rest is mirrored, half the work of the product. Beyond that, each chunk of ``chunk_size``
    queries is scored against all N at a time. Counting adds a few ``chunk_size x N`` temporaries.
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
    table, group = _class_members(labels)
    inf_column = torch.full((min(chunk_size, n), 1), torch.inf, dtype=features.dtype, device=device)
    full = _symmetric_similarity(features) if n * n * features.element_size() <= max_matrix_bytes else None
    totals = [0, 0, 0.0, 0]  # rank-1 hits, rank-5 hits, AP sum, queries with a positive
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sim = full[start:stop] if full is not None else features[start:stop] @ features.T
        counts = _score_chunk(sim, start, labels, table, group, inf_column)
        totals = [total + count for total, count in zip(totals, counts)]
        del sim
    hits1, hits5, ap_sum, with_positives = totals
    return {
        "rank1": hits1 / n,
        "rank5": hits5 / n,
        "mAP": ap_sum / with_positives if with_positives else 0.0,
    }
