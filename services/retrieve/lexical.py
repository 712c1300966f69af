"""BM25 over the chunks, with bm25s.

bm25s builds a static sparse index, so this wrapper keeps each chunk's token ids (tokenised once,
with an incrementally grown vocabulary) and rebuilds an immutable snapshot in a worker thread when
chunks were added or removed. Searches read the current snapshot; chunks not in it yet are still
found through the dense index, and removed ones are filtered out by the caller.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import bm25s
import numpy as np
import Stemmer
from bm25s.tokenization import Tokenized, Tokenizer


@dataclass(frozen=True)
class _Snapshot:
    retriever: bm25s.BM25
    row_ids: np.ndarray  # row -> chunk int id
    vocab: frozenset[str]


class LexicalIndex:
    def __init__(self, language: str = "english"):
        self._tokenizer = Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer(language).stemWord)
        self._docs: dict[int, list[int]] = {}
        self._snapshot: _Snapshot | None = None
        self._changes = 0
        self._lock = threading.Lock()  # guards the tokenizer's vocabulary

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def pending_changes(self) -> int:
        return self._changes

    def add(self, ids: list[int], texts: list[str]) -> None:
        if not ids:
            return
        with self._lock:
            token_ids = self._tokenizer.tokenize(
                texts, update_vocab=True, return_as="ids", show_progress=False
            )
        for i, toks in zip(ids, token_ids, strict=True):
            self._docs[i] = list(toks)
        self._changes += len(ids)

    def remove(self, ids: list[int]) -> None:
        for i in ids:
            if self._docs.pop(i, None) is not None:
                self._changes += 1

    def rebuild(self) -> None:
        """Builds a new snapshot of the current chunks. Safe to run in a worker thread while the
        event loop adds and removes chunks (it works on a copy taken at the start)."""
        changes = self._changes
        items = list(self._docs.items())
        with self._lock:
            vocab = dict(self._tokenizer.get_vocab_dict())
        if not items:
            self._snapshot = None
        else:
            retriever = bm25s.BM25()
            retriever.index(Tokenized(ids=[t for _, t in items], vocab=vocab), show_progress=False)
            self._snapshot = _Snapshot(
                retriever,
                np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items)),
                frozenset(retriever.vocab_dict),
            )
        self._changes -= changes

    def search(
        self, query: str, k: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """Best ``k`` chunk ids with positive BM25 score. ``allowed`` is a function of the
        snapshot rows given as a boolean mask over chunk ids (see :meth:`mask_for`)."""
        snap = self._snapshot
        if snap is None or k <= 0:
            return []
        with self._lock:
            tokens = self._tokenizer.tokenize(
                [query], update_vocab=False, return_as="tuple", show_progress=False
            )
        inverse = {v: t for t, v in tokens.vocab.items()}
        words = [inverse[i] for i in tokens.ids[0] if inverse.get(i) in snap.vocab]
        if not words:
            return []
        k = min(k, len(snap.row_ids))
        weight_mask = None
        if allowed is not None:
            weight_mask = allowed[snap.row_ids].astype(np.float32)
            if not weight_mask.any():
                return []
        rows, scores = snap.retriever.retrieve(
            [words], k=k, show_progress=False, weight_mask=weight_mask, n_threads=1
        )
        return [
            (int(snap.row_ids[r]), float(s))
            for r, s in zip(rows[0], scores[0], strict=True)
            if s > 0
        ]
