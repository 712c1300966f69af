"""Drift statistics between a reference set of query embeddings and a window of live ones.

- Unbiased MMD² with an RBF kernel whose bandwidth comes from the reference (median heuristic,
  as alibi-detect's ``sigma_median``: k(a, b) = exp(-|a-b|² / (2σ²)), σ² = median(|a-b|²) / 2),
  and a permutation-test p-value computed for all permutations at once: each permutation is a
  row of a 0/1 membership matrix P, and the three kernel sums of every permutation come from
  one matrix product P·K (no Python loop over permutations).
- KL divergence (additively smoothed) between the window's and the reference's histograms over
  (a) topic clusters of the reference embeddings (k-means) and (b) question terms.

The reference's statistics (bandwidth, centroids, histograms, the reference-reference kernel)
are computed once (:class:`Reference`) and reused for every window.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "been",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "how",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "may",
        "might",
        "more",
        "most",
        "no",
        "not",
        "of",
        "on",
        "or",
        "should",
        "so",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "to",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
    ]
)
_TERM = re.compile(r"[a-z][a-z0-9\-]+")


def terms(text: str) -> list[str]:
    return [t for t in _TERM.findall(text.lower()) if t not in STOPWORDS]


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two normalised histograms (already smoothed, so no zeros)."""
    return float(np.sum(p * np.log(p / q)))


def smoothed(counts: np.ndarray, alpha: float) -> np.ndarray:
    counts = counts.astype(np.float64) + alpha
    return counts / counts.sum()


@dataclass
class Reference:
    """A reference sample and everything precomputed from it."""

    embeddings: np.ndarray  # [n, d], float32
    texts: list[str]
    sigma2: float
    centroids: np.ndarray  # [k, d]
    topic_hist: np.ndarray  # smoothed, [k]
    vocabulary: dict[str, int]  # term -> index; index len(vocabulary) is "other"
    term_hist: np.ndarray  # smoothed, [V + 1]
    alpha: float = 0.5
    # Reference-reference kernel (reused by every window's permutation test) and its
    # off-diagonal sum.
    kxx: torch.Tensor = field(default_factory=lambda: torch.zeros(0), repr=False)
    kxx_sum: float = 0.0

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        texts: list[str],
        topics: int = 8,
        vocabulary_size: int = 500,
        alpha: float = 0.5,
        seed: int = 0,
    ) -> Reference:
        from sklearn.cluster import KMeans

        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if len(x) < max(4, topics):
            raise ValueError(f"a reference needs at least {max(4, topics)} samples, got {len(x)}")
        t = torch.from_numpy(x)
        d2 = torch.cdist(t, t).pow(2)
        n = len(x)
        off_diagonal = d2[~torch.eye(n, dtype=torch.bool)]
        sigma2 = float(off_diagonal.median()) / 2 or 1.0
        km = KMeans(n_clusters=topics, n_init=4, random_state=seed).fit(x)
        topic_counts = np.bincount(km.labels_, minlength=topics)
        counts = Counter(term for text in texts for term in terms(text))
        vocabulary = {term: i for i, (term, _) in enumerate(counts.most_common(vocabulary_size))}
        ref = cls(
            embeddings=x,
            texts=list(texts),
            sigma2=sigma2,
            centroids=km.cluster_centers_.astype(np.float32),
            topic_hist=smoothed(topic_counts, alpha),
            vocabulary=vocabulary,
            term_hist=np.zeros(0),
            alpha=alpha,
        )
        ref.term_hist = smoothed(ref.term_counts(texts), alpha)
        ref._set_kernel(d2)
        return ref

    def _set_kernel(self, d2: torch.Tensor | None = None) -> None:
        if d2 is None:
            t = torch.from_numpy(self.embeddings)
            d2 = torch.cdist(t, t).pow(2)
        self.kxx = torch.exp(-d2 / (2 * self.sigma2))
        self.kxx_sum = float(self.kxx.sum() - len(self.embeddings))  # the diagonal is all ones

    def to_arrays(self) -> dict[str, Any]:
        """Everything but the kernel (cheap to recompute), for storage."""
        return {
            "embeddings": self.embeddings,
            "texts": self.texts,
            "sigma2": self.sigma2,
            "centroids": self.centroids,
            "topic_hist": self.topic_hist,
            "vocabulary": self.vocabulary,
            "term_hist": self.term_hist,
            "alpha": self.alpha,
        }

    @classmethod
    def from_arrays(cls, data: dict[str, Any]) -> Reference:
        ref = cls(**data)
        ref._set_kernel()
        return ref

    def assign_topics(self, embeddings: np.ndarray) -> np.ndarray:
        d = torch.cdist(
            torch.from_numpy(np.asarray(embeddings, np.float32)), torch.from_numpy(self.centroids)
        )
        return d.argmin(dim=1).numpy()

    def topic_counts(self, embeddings: np.ndarray) -> np.ndarray:
        return np.bincount(self.assign_topics(embeddings), minlength=len(self.centroids))

    def term_counts(self, texts: list[str]) -> np.ndarray:
        counts = np.zeros(len(self.vocabulary) + 1, dtype=np.int64)
        other = len(self.vocabulary)
        for text in texts:
            for term in terms(text):
                counts[self.vocabulary.get(term, other)] += 1
        return counts


@dataclass
class WindowStats:
    mmd2: float
    p_value: float
    kl_topics: float
    kl_terms: float
    # Topics whose share grew the most in the window, with (window share, reference share).
    drifted_topics: list[tuple[int, float, float]]
    # The most frequent terms of the window's questions in each of those topics.
    topic_terms: dict[int, list[str]] = field(default_factory=dict)


def mmd2_permutation_test(
    ref: Reference,
    window: np.ndarray,
    permutations: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Unbiased MMD² between the reference and the window, and its permutation p-value."""
    x = torch.from_numpy(ref.embeddings)
    y = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))
    n, m = len(x), len(y)
    if m < 2:
        raise ValueError("a window needs at least 2 samples")
    gamma = 1.0 / (2 * ref.sigma2)
    kxy = torch.exp(-torch.cdist(x, y).pow(2) * gamma)
    kyy = torch.exp(-torch.cdist(y, y).pow(2) * gamma)
    observed = (
        ref.kxx_sum / (n * (n - 1))
        + float(kyy.sum() - m) / (m * (m - 1))
        - 2 * float(kxy.sum()) / (n * m)
    )
    # The full kernel over the pooled sample; the reference block is the only O(n²) part.
    k = torch.cat([torch.cat([ref.kxx, kxy], 1), torch.cat([kxy.T, kyy], 1)], 0)
    total = n + m
    # Row i of ``members``: 1 where pooled sample j falls in the "window" side of permutation i.
    order = torch.argsort(torch.rand(permutations, total, generator=generator), dim=1)
    members = torch.zeros(permutations, total)
    members.scatter_(1, order[:, :m], 1.0)
    k_sum = float(k.sum() - total)  # all off-diagonal entries
    pk = members @ k  # [P, N]
    yy = (pk * members).sum(1) - m  # window-window off-diagonal sums
    row = pk.sum(1)  # sum over window rows of all columns, incl. the diagonal
    xy = row - yy - m  # window x reference
    xx = k_sum - yy - 2 * xy  # reference-reference off-diagonal
    permuted = xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)
    p_value = float((permuted >= observed).float().mean())
    return observed, p_value


def window_stats(
    ref: Reference,
    embeddings: np.ndarray,
    texts: list[str],
    permutations: int = 100,
    generator: torch.Generator | None = None,
) -> WindowStats:
    mmd2, p_value = mmd2_permutation_test(ref, embeddings, permutations, generator)
    labels = ref.assign_topics(embeddings)
    topic_window = smoothed(np.bincount(labels, minlength=len(ref.centroids)), ref.alpha)
    term_window = smoothed(ref.term_counts(texts), ref.alpha)
    growth = topic_window - ref.topic_hist
    top = [int(i) for i in np.argsort(-growth)[:3] if growth[i] > 0]
    return WindowStats(
        mmd2=mmd2,
        p_value=p_value,
        kl_topics=kl_divergence(topic_window, ref.topic_hist),
        kl_terms=kl_divergence(term_window, ref.term_hist),
        drifted_topics=[(i, float(topic_window[i]), float(ref.topic_hist[i])) for i in top],
        topic_terms={
            i: [
                t
                for t, _ in Counter(
                    term
                    for text, label in zip(texts, labels, strict=True)
                    if label == i
                    for term in terms(text)
                ).most_common(5)
            ]
            for i in top
        },
    )
