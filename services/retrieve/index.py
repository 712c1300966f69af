"""The in-memory search view: chunk records, a dense backend and a BM25 index, fused.

Everything here runs on the event loop's thread except the BM25 snapshot build, which works on a
copy (see :mod:`services.retrieve.lexical`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from knowstream.events.v1 import events_pb2
from services.retrieve.dense import DenseBackend, Filters, VectorMeta
from services.retrieve.fusion import weighted_rrf
from services.retrieve.lexical import LexicalIndex


@dataclass
class ChunkRecord:
    int_id: int
    chunk: events_pb2.ChunkEvent
    vector: np.ndarray

    @property
    def doc_id(self) -> str:
        return self.chunk.doc_id


@dataclass
class Hit:
    record: ChunkRecord
    score: float
    dense_score: float = 0.0
    bm25_score: float = 0.0
    dense_rank: int = 0
    bm25_rank: int = 0


@dataclass
class FusionConfig:
    dense_weight: float = 1.0
    bm25_weight: float = 1.0
    rrf_k: int = 60
    candidates: int = 50


@dataclass
class _Codes:
    """Dictionary-encodes a metadata field so that filters become vectorised comparisons."""

    codes: dict[str, int] = field(default_factory=dict)

    def code(self, value: str) -> int:
        return self.codes.setdefault(value, len(self.codes))


class HybridIndex:
    def __init__(self, dense: DenseBackend, dimension: int):
        self.dense = dense
        self.dimension = dimension
        self.exact_scan_limit = 2000
        self._reset()

    def _reset(self) -> None:
        self.lexical = LexicalIndex()
        self.records: dict[int, ChunkRecord] = {}
        self.by_chunk_id: dict[str, int] = {}
        self.by_doc: dict[str, set[int]] = {}
        self._next_id = 0
        self._live = np.zeros(1024, dtype=bool)
        self._domain = np.full(1024, -1, dtype=np.int32)
        self._source = np.full(1024, -1, dtype=np.int32)
        # A chunk's access groups, encoded as the code of its whole (sorted) set of groups:
        # few distinct sets exist, so a scope filter is one vectorised isin over the codes of
        # the sets it may read ("" = public).
        self._acl = np.full(1024, -1, dtype=np.int32)
        self._domains = _Codes()
        self._sources = _Codes()
        self._acls = _Codes()
        self._changes_during_compaction: list[tuple[str, list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def documents(self) -> int:
        return len(self.by_doc)

    def _grow(self, size: int) -> None:
        if size <= len(self._live):
            return
        new = max(size, 2 * len(self._live))
        for name, fill in (("_live", False), ("_domain", -1), ("_source", -1), ("_acl", -1)):
            old = getattr(self, name)
            grown = np.full(new, fill, dtype=old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)

    def add(self, chunks: list[events_pb2.EmbeddedChunk]) -> int:
        """Adds chunks (a chunk id already present is skipped); returns how many were new."""
        fresh = [c for c in chunks if c.chunk.chunk_id not in self.by_chunk_id]
        if not fresh:
            return 0
        ids = np.arange(self._next_id, self._next_id + len(fresh), dtype=np.int64)
        self._next_id += len(fresh)
        self._grow(self._next_id)
        vectors = np.asarray([list(c.vector) for c in fresh], dtype=np.float32)
        if vectors.shape[1] != self.dimension:
            raise ValueError(f"vector dimension {vectors.shape[1]} != {self.dimension}")
        metas = []
        for int_id, c, vec in zip(ids, fresh, vectors, strict=True):
            i = int(int_id)
            chunk = c.chunk
            self.records[i] = ChunkRecord(i, chunk, vec)
            self.by_chunk_id[chunk.chunk_id] = i
            self.by_doc.setdefault(chunk.doc_id, set()).add(i)
            self._live[i] = True
            self._domain[i] = self._domains.code(chunk.metadata.domain)
            self._source[i] = self._sources.code(chunk.metadata.source)
            groups = tuple(sorted(set(chunk.metadata.access_groups)))
            self._acl[i] = self._acls.code(_ACL_SEP.join(groups))
            metas.append(
                VectorMeta(chunk.doc_id, chunk.metadata.domain, chunk.metadata.source, groups)
            )
        self.dense.add(ids, vectors, metas)
        if self._changes_during_compaction is not None:
            self._changes_during_compaction.append(("add", [int(i) for i in ids]))
        self.lexical.add([int(i) for i in ids], [_lexical_text(c.chunk) for c in fresh])
        return len(fresh)

    def remove(self, chunk_ids: list[str]) -> int:
        ids = [self.by_chunk_id.pop(c) for c in chunk_ids if c in self.by_chunk_id]
        for i in ids:
            record = self.records.pop(i)
            doc = self.by_doc.get(record.doc_id)
            if doc is not None:
                doc.discard(i)
                if not doc:
                    del self.by_doc[record.doc_id]
            self._live[i] = False
        arr = np.asarray(ids, dtype=np.int64)
        self.dense.remove(arr)
        if self._changes_during_compaction is not None:
            self._changes_during_compaction.append(("remove", ids))
        self.lexical.remove(ids)
        return len(ids)

    def metadata(self, chunk: events_pb2.ChunkEvent) -> events_pb2.DocumentMetadata:
        """A chunk's document metadata. Ingest puts tags and attributes only on the first chunk
        of a version (once per document); every chunk has the filterable fields. A version is
        indexed only once all its chunks are here, so its first chunk is found."""
        md = chunk.metadata
        if chunk.chunk_index == 0 or md.tags or md.attributes:
            return md
        for i in self.by_doc.get(chunk.doc_id, ()):
            head = self.records[i].chunk
            if head.chunk_index == 0 and head.content_hash == chunk.content_hash:
                return head.metadata
        return md

    def needs_compaction(self, min_tombstones: int = 1000) -> bool:
        """True once removed chunks make up a quarter of an HNSW graph."""
        tombstones: set[int] = getattr(self.dense, "tombstones", None) or set()
        return len(tombstones) >= max(min_tombstones, len(self.records) // 3, 1)

    async def compact(self) -> None:
        """Rebuilds the HNSW graph from the live vectors in a worker thread, then swaps it in.

        Searches and indexing go on against the old graph meanwhile; chunks added or removed
        during the build are replayed onto the new one before the swap.
        """
        ids = np.fromiter(self.records, dtype=np.int64, count=len(self.records))
        vectors = (
            np.stack([self.records[int(i)].vector for i in ids])
            if len(ids)
            else np.zeros((0, self.dimension), dtype=np.float32)
        )
        self._changes_during_compaction = []
        try:
            fresh = await asyncio.to_thread(self.dense.rebuilt, ids, vectors)  # type: ignore[attr-defined]
            for op, op_ids in self._changes_during_compaction:
                if op == "add":
                    live = [i for i in op_ids if i in self.records]
                    if live:
                        fresh.add(
                            np.asarray(live, dtype=np.int64),
                            np.stack([self.records[i].vector for i in live]),
                            [],
                        )
                else:
                    fresh.remove(np.asarray(op_ids, dtype=np.int64))
            self.dense = fresh
        finally:
            self._changes_during_compaction = None

    def clear(self) -> None:
        self.dense.reset()
        self._reset()

    def filter_mask(self, filters: Filters) -> np.ndarray | None:
        if not filters:
            return None
        mask = self._live.copy()
        if filters.domains:
            codes = [self._domains.codes[d] for d in filters.domains if d in self._domains.codes]
            mask &= np.isin(self._domain, codes)
        if filters.sources:
            codes = [self._sources.codes[s] for s in filters.sources if s in self._sources.codes]
            mask &= np.isin(self._source, codes)
        if filters.doc_ids:
            doc_mask = np.zeros_like(mask)
            for d in filters.doc_ids:
                doc_mask[list(self.by_doc.get(d, ()))] = True
            mask &= doc_mask
        if filters.groups is not None:
            mask &= np.isin(self._acl, self._readable_acls(filters.groups))
        return mask

    def _readable_acls(self, scope: frozenset[str]) -> list[int]:
        """Codes of the group sets readable within ``scope``: public, or sharing a group."""
        return [
            code
            for key, code in self._acls.codes.items()
            if not key or not scope.isdisjoint(key.split(_ACL_SEP))
        ]

    def search_dense(
        self, vector: np.ndarray, k: int, filters: Filters, mask: np.ndarray | None
    ) -> list[tuple[int, float]]:
        if mask is not None:
            allowed_ids = np.flatnonzero(mask)
            # A graph index explores a neighbourhood and can miss the few allowed chunks of a
            # selective filter; below this size an exact scan of them is also cheaper.
            if len(allowed_ids) <= max(self.exact_scan_limit, len(self.records) // 20):
                return self._exact(vector, allowed_ids, k)
        allowed = mask
        if allowed is None and self.dense.needs_mask:
            allowed = self._live
        return [
            (i, s) for i, s in self.dense.search(vector, k, allowed, filters) if i in self.records
        ]

    def _exact(self, vector: np.ndarray, ids: np.ndarray, k: int) -> list[tuple[int, float]]:
        ids = np.asarray([i for i in ids if int(i) in self.records], dtype=np.int64)
        if not len(ids):
            return []
        matrix = np.stack([self.records[int(i)].vector for i in ids])
        scores = matrix @ vector.astype(np.float32)
        top = np.argsort(-scores)[:k]
        return [(int(ids[t]), float(scores[t])) for t in top]

    def search_bm25(self, query: str, k: int, mask: np.ndarray | None) -> list[tuple[int, float]]:
        # The snapshot may still hold removed chunks: over-fetch a little and drop them.
        hits = self.lexical.search(query, k + 8, mask)
        return [(i, s) for i, s in hits if i in self.records][:k]

    def fuse(
        self,
        dense: list[tuple[int, float]],
        bm25: list[tuple[int, float]],
        k: int,
        config: FusionConfig,
    ) -> list[Hit]:
        dense_info = {i: (rank, s) for rank, (i, s) in enumerate(dense, start=1)}
        bm25_info = {i: (rank, s) for rank, (i, s) in enumerate(bm25, start=1)}
        fused = weighted_rrf(
            [[i for i, _ in dense], [i for i, _ in bm25]],
            [config.dense_weight, config.bm25_weight],
            config.rrf_k,
        )
        hits = []
        for i, score in fused[:k]:
            d_rank, d_score = dense_info.get(i, (0, 0.0))
            b_rank, b_score = bm25_info.get(i, (0, 0.0))
            hits.append(Hit(self.records[i], score, d_score, b_score, d_rank, b_rank))
        return hits

    def single(self, results: list[tuple[int, float]], k: int, which: str) -> list[Hit]:
        hits = []
        for rank, (i, s) in enumerate(results[:k], start=1):
            hit = Hit(self.records[i], s)
            if which == "dense":
                hit.dense_score, hit.dense_rank = s, rank
            else:
                hit.bm25_score, hit.bm25_rank = s, rank
            hits.append(hit)
        return hits


_ACL_SEP = "\x1f"  # group names never hold it (services/common/access.py)


def _lexical_text(chunk: events_pb2.ChunkEvent) -> str:
    return f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text
