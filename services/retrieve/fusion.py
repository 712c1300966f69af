"""Rank fusion of the dense and BM25 candidate lists.

Plain reciprocal rank fusion gives both lists the same say; when one retriever is much better
than the other on a corpus, plain RRF can rank below that retriever alone. Weighted RRF lets the
stronger one lead (weights are settings, picked by ``bench.retrieval --sweep``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

Id = TypeVar("Id", bound=Hashable)


def weighted_rrf(
    rankings: Sequence[Sequence[Id]], weights: Sequence[float], k0: int = 60
) -> list[tuple[Id, float]]:
    """Fuses ranked id lists (best first): score(d) = sum_i w_i / (k0 + rank_i(d)).

    Ties break towards the id ranked best in the earliest list, so the result is deterministic.
    """
    if len(rankings) != len(weights):
        raise ValueError("one weight per ranking")
    scores: dict[Id, float] = {}
    first_seen: dict[Id, tuple[int, int]] = {}
    for li, (ranking, weight) in enumerate(zip(rankings, weights, strict=True)):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k0 + rank)
            first_seen.setdefault(item, (rank, li))
    return sorted(scores.items(), key=lambda kv: (-kv[1], first_seen[kv[0]]))


def rrf(rankings: Sequence[Sequence[Id]], k0: int = 60) -> list[tuple[Id, float]]:
    return weighted_rrf(rankings, [1.0] * len(rankings), k0)
