"""The ingest path as plain code: validate, deduplicate by content hash, chunk, publish.

An accepted version is recorded in the registry's outbox (Redis) before its records are
published, and both happen before the caller's ack: the broker may lose its log (the embedded
one keeps nothing across a restart) and the reconciler publishes the version again from the
outbox. A crash between recording and publishing is the same case. "Unchanged" means indexed:
a version accepted but not yet searchable is published again when it comes again (harmless:
chunk ids are derived from the content).

Publications of one document are serialised by a lock shared with the reconciler, so an older
version it publishes again can never land after a newer one (retrieve activates whichever
version completes last).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2
from services.common.kafka import new_header, now_ms
from services.common.limits import LimitSettings
from services.ingest.chunking import Chunker
from services.ingest.documents import CleanDocument, InvalidDocument, clean_document
from services.ingest.registry import Accepted, Known, LogPosition, Pending

log = logging.getLogger(__name__)

# (topic, key, value) records; returns, once the broker acknowledged all of them, where each
# went (in order).
Publish = Callable[[Sequence[tuple[str, bytes, bytes]]], Awaitable[list[LogPosition]]]


class DocumentRegistry(Protocol):
    """Accepted versions and their outbox (Redis in production: registry.py; a dict in unit
    tests)."""

    async def known(self, ids: Sequence[str]) -> list[Known]: ...
    async def accept(self, docs: Sequence[Accepted], due_ms: int) -> None: ...
    async def tombstone(self, doc_id: str, at_ms: int, due_ms: int) -> None: ...
    async def published(
        self,
        doc_id: str,
        content_hash: str,
        position: LogPosition,
        at_ms: int,
        attempts: int,
        due_ms: int,
    ) -> bool: ...
    async def pending(self, ids: Sequence[str]) -> list[Pending | None]: ...
    async def get(self, doc_id: str) -> tuple[str, int, int] | None: ...


@dataclass
class RawInput:
    id: str | bytes
    title: str | bytes
    text: str | bytes
    source: str = ""
    domain: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] | None = None
    access_groups: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, doc: ingest_pb2.Document | events_pb2.RawDocument) -> RawInput:
        md = doc.metadata
        return cls(
            doc.id,
            doc.title,
            doc.text,
            md.source,
            md.domain,
            tuple(md.tags),
            dict(md.attributes),
            tuple(md.access_groups),
        )


def metadata_of(doc: CleanDocument) -> events_pb2.DocumentMetadata:
    return events_pb2.DocumentMetadata(
        source=doc.source,
        domain=doc.domain,
        tags=doc.tags,
        attributes=doc.attributes,
        access_groups=doc.access_groups,
    )


def filterable_metadata(doc: CleanDocument) -> events_pb2.DocumentMetadata:
    """What every chunk carries: the fields searches filter on and access control reads."""
    return events_pb2.DocumentMetadata(
        source=doc.source, domain=doc.domain, access_groups=doc.access_groups
    )


def chunk_id(doc_id: str, content_hash: str, index: int) -> str:
    return f"{doc_id}#{content_hash[:16]}#{index}"


def outbox_body(doc: CleanDocument, trace_id: str = "") -> bytes:
    """The cleaned document as the outbox keeps it (a versioned RawDocument event)."""
    return events_pb2.RawDocument(
        header=new_header("ingest", trace_id),
        id=doc.id,
        title=doc.title,
        text=doc.text,
        metadata=metadata_of(doc),
    ).SerializeToString()


def from_outbox(body: bytes) -> CleanDocument:
    """The document as it was accepted (already clean: not validated or normalised again, so
    its content hash is the same)."""
    raw = events_pb2.RawDocument.FromString(body)
    md = raw.metadata
    return CleanDocument(
        raw.id,
        raw.title,
        raw.text,
        md.source,
        md.domain,
        tuple(md.tags),
        dict(md.attributes),
        tuple(md.access_groups),
    )


class IngestPipeline:
    def __init__(
        self,
        chunker: Chunker,
        registry: DocumentRegistry,
        publish: Publish,
        chunk_topic: str,
        max_document_bytes: int,
        check_after_s: float = 60.0,
        limits: LimitSettings | None = None,
    ):
        self.chunker = chunker
        self.registry = registry
        self.publish = publish
        self.chunk_topic = chunk_topic
        self.max_document_bytes = max_document_bytes
        # When the reconciler first looks at a published version that is not yet searchable.
        self.check_after_s = check_after_s
        # Metadata caps (KS_LIMIT_*): the same for gRPC and the raw topic, checked here only.
        self.limits = limits or LimitSettings()
        self.lock = asyncio.Lock()

    def validate(self, raw: RawInput) -> CleanDocument:
        return clean_document(
            raw.id,
            raw.title,
            raw.text,
            source=raw.source,
            domain=raw.domain,
            tags=raw.tags,
            attributes=raw.attributes,
            access_groups=raw.access_groups,
            max_bytes=self.max_document_bytes,
            limits=self.limits,
        )

    async def ingest(
        self, inputs: Sequence[RawInput], trace_id: str = ""
    ) -> list[ingest_pb2.DocumentResult]:
        """Ingests a batch; one result per input, in order. Invalid inputs do not affect the
        valid ones."""
        results: list[ingest_pb2.DocumentResult] = []
        clean: list[tuple[int, CleanDocument]] = []
        for i, raw in enumerate(inputs):
            try:
                doc = self.validate(raw)
            except InvalidDocument as exc:
                doc_id = raw.id if isinstance(raw.id, str) else raw.id.decode("utf-8", "replace")
                results.append(
                    ingest_pb2.DocumentResult(
                        id=doc_id, status=ingest_pb2.INGEST_STATUS_REJECTED, error=str(exc)
                    )
                )
                continue
            results.append(ingest_pb2.DocumentResult(id=doc.id, content_hash=doc.content_hash))
            clean.append((i, doc))

        known = await self.registry.known([d.id for _, d in clean])
        records: list[tuple[str, bytes, bytes]] = []
        accepted: list[tuple[int, CleanDocument, int]] = []
        seen: dict[str, str] = {}
        acked_at = now_ms()
        for (i, doc), state in zip(clean, known, strict=True):
            h = doc.content_hash
            indexed = state.accepted == h and state.active == h
            if seen.get(doc.id) == h or (doc.id not in seen and indexed):
                results[i].status = ingest_pb2.INGEST_STATUS_UNCHANGED
                continue
            seen[doc.id] = h
            events = self._chunk_events(doc, h, acked_at, trace_id)
            key = doc.id.encode()
            records.extend((self.chunk_topic, key, e.SerializeToString()) for e in events)
            accepted.append((i, doc, len(events)))
        if records:
            versions = [
                Accepted(d.id, d.content_hash, n, acked_at, outbox_body(d, trace_id))
                for _, d, n in accepted
            ]
            async with self.lock:
                await self.registry.accept(versions, self._due(0))
                positions = await self.publish(records)
                await self._published(
                    [(d.id, d.content_hash) for _, d, _ in accepted],
                    [n for _, _, n in accepted],
                    positions,
                    attempts=1,
                )
        done = now_ms()
        for i, _, n in accepted:
            results[i].status = ingest_pb2.INGEST_STATUS_ACCEPTED
            results[i].chunk_count = n
        for r in results:
            if r.status != ingest_pb2.INGEST_STATUS_REJECTED:
                r.acked_at_ms = done
        return results

    def _due(self, attempts: int) -> int:
        """When to look at a publication again: the check delay, doubled per publication
        after the first (a version that keeps not arriving is not re-sent in a tight loop)."""
        return now_ms() + int(self.check_after_s * 1000 * 2 ** max(0, min(attempts - 1, 6)))

    async def _published(
        self,
        states: Sequence[tuple[str, str]],
        counts: Sequence[int],
        positions: Sequence[LogPosition],
        attempts: int,
    ) -> None:
        """Notes where each (doc id, content hash) state's last record went; ``counts``: how
        many records of ``positions`` each one had, in order."""
        at, end = now_ms(), 0
        for (doc_id, h), n in zip(states, counts, strict=True):
            end += n
            await self.registry.published(
                doc_id, h, positions[end - 1], at, attempts, self._due(attempts)
            )

    async def republish(self, doc_id: str) -> bool:
        """Publishes a document's recorded state again (the reconciler's step), unless it was
        applied or replaced meanwhile; True if it published."""
        async with self.lock:
            (state,) = await self.registry.pending([doc_id])
            if state is None or state.settled:
                return False
            if state.deletion:
                records = [self._deletion(doc_id)]
            elif state.body is None:
                log.warning("document %s: accepted but its outbox body is missing", doc_id)
                return False
            else:
                doc = from_outbox(state.body)
                events = self._chunk_events(doc, state.content_hash, state.accepted_at_ms, "")
                records = [
                    (self.chunk_topic, doc_id.encode(), e.SerializeToString()) for e in events
                ]
            positions = await self.publish(records)
            await self._published(
                [(doc_id, state.content_hash)], [len(records)], positions, state.attempts + 1
            )
            return True

    def _chunk_events(
        self, doc: CleanDocument, content_hash: str, ingested_at: int, trace_id: str
    ) -> list[events_pb2.KnowledgeEvent]:
        chunks = self.chunker.chunk(doc.text)
        # Tags and attributes are stored once per document, on its first chunk (retrieve returns
        # them with every hit from there): copied into each chunk they would multiply a
        # document's metadata by its chunk count in the log, in Redis and in memory.
        whole, filterable = metadata_of(doc), filterable_metadata(doc)
        return [
            events_pb2.KnowledgeEvent(
                chunk=events_pb2.ChunkEvent(
                    header=new_header("ingest", trace_id),
                    doc_id=doc.id,
                    content_hash=content_hash,
                    chunk_id=chunk_id(doc.id, content_hash, c.index),
                    chunk_index=c.index,
                    chunk_count=len(chunks),
                    title=doc.title,
                    text=c.text,
                    metadata=whole if c.index == 0 else filterable,
                    token_start=c.token_start,
                    token_end=c.token_end,
                    ingested_at_ms=ingested_at,
                )
            )
            for c in chunks
        ]

    def _deletion(self, doc_id: str, trace_id: str = "") -> tuple[str, bytes, bytes]:
        event = events_pb2.KnowledgeEvent(
            deleted=events_pb2.DocumentDeleted(header=new_header("ingest", trace_id), doc_id=doc_id)
        )
        return (self.chunk_topic, doc_id.encode(), event.SerializeToString())

    async def delete(self, doc_id: str, trace_id: str = "") -> bool:
        """Publishes a deletion for a known document, kept as a tombstone in the outbox until
        retrieve has applied it; False if the id is unknown."""
        if await self.registry.get(doc_id) is None:
            return False
        async with self.lock:
            await self.registry.tombstone(doc_id, now_ms(), self._due(0))
            positions = await self.publish([self._deletion(doc_id, trace_id)])
            await self._published([(doc_id, "")], [1], positions, attempts=1)
        return True


def summarize(results: Sequence[ingest_pb2.DocumentResult]) -> ingest_pb2.IngestDocumentsResponse:
    reply = ingest_pb2.IngestDocumentsResponse(results=results)
    for r in results:
        if r.status == ingest_pb2.INGEST_STATUS_ACCEPTED:
            reply.accepted += 1
        elif r.status == ingest_pb2.INGEST_STATUS_UNCHANGED:
            reply.unchanged += 1
        else:
            reply.rejected += 1
    return reply
