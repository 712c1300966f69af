"""The ingest path as plain code: validate, deduplicate by content hash, chunk, publish.

Publishing happens before the document registry is updated, so a crash in between leads to a
re-publish (harmless: chunk ids are derived from the content) rather than a lost document.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2
from services.common.kafka import new_header, now_ms
from services.ingest.chunking import Chunker
from services.ingest.documents import CleanDocument, InvalidDocument, clean_document

log = logging.getLogger(__name__)

# (topic, key, value) records; returns once the broker acknowledged all of them.
Publish = Callable[[Sequence[tuple[str, bytes, bytes]]], Awaitable[None]]


class DocumentRegistry(Protocol):
    """Latest accepted version per document id (Redis in production, a dict in unit tests)."""

    async def get_hashes(self, ids: Sequence[str]) -> list[str | None]: ...
    async def record(self, docs: Sequence[tuple[str, str, int, int]]) -> None: ...
    async def get(self, doc_id: str) -> tuple[str, int, int] | None: ...
    async def delete(self, doc_id: str) -> bool: ...


@dataclass
class RawInput:
    id: str | bytes
    title: str | bytes
    text: str | bytes
    source: str = ""
    domain: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] | None = None

    @classmethod
    def from_proto(cls, doc: ingest_pb2.Document | events_pb2.RawDocument) -> RawInput:
        md = doc.metadata
        return cls(
            doc.id, doc.title, doc.text, md.source, md.domain, tuple(md.tags), dict(md.attributes)
        )


def chunk_id(doc_id: str, content_hash: str, index: int) -> str:
    return f"{doc_id}#{content_hash[:16]}#{index}"


class IngestPipeline:
    def __init__(
        self,
        chunker: Chunker,
        registry: DocumentRegistry,
        publish: Publish,
        chunk_topic: str,
        max_document_bytes: int,
    ):
        self.chunker = chunker
        self.registry = registry
        self.publish = publish
        self.chunk_topic = chunk_topic
        self.max_document_bytes = max_document_bytes

    def validate(self, raw: RawInput) -> CleanDocument:
        return clean_document(
            raw.id,
            raw.title,
            raw.text,
            source=raw.source,
            domain=raw.domain,
            tags=raw.tags,
            attributes=raw.attributes,
            max_bytes=self.max_document_bytes,
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

        known = await self.registry.get_hashes([d.id for _, d in clean])
        records: list[tuple[str, bytes, bytes]] = []
        accepted: list[tuple[int, CleanDocument, int]] = []
        seen: dict[str, str] = {}
        acked_at = now_ms()
        for (i, doc), current in zip(clean, known, strict=True):
            h = doc.content_hash
            if seen.get(doc.id, current if isinstance(current, str) else None) == h:
                results[i].status = ingest_pb2.INGEST_STATUS_UNCHANGED
                continue
            seen[doc.id] = h
            events = self._chunk_events(doc, h, acked_at, trace_id)
            key = doc.id.encode()
            records.extend((self.chunk_topic, key, e.SerializeToString()) for e in events)
            accepted.append((i, doc, len(events)))
        if records:
            await self.publish(records)
            await self.registry.record(
                [(d.id, d.content_hash, n, acked_at) for _, d, n in accepted]
            )
        done = now_ms()
        for i, _, n in accepted:
            results[i].status = ingest_pb2.INGEST_STATUS_ACCEPTED
            results[i].chunk_count = n
        for r in results:
            if r.status != ingest_pb2.INGEST_STATUS_REJECTED:
                r.acked_at_ms = done
        return results

    def _chunk_events(
        self, doc: CleanDocument, content_hash: str, ingested_at: int, trace_id: str
    ) -> list[events_pb2.KnowledgeEvent]:
        chunks = self.chunker.chunk(doc.text)
        metadata = events_pb2.DocumentMetadata(
            source=doc.source, domain=doc.domain, tags=doc.tags, attributes=doc.attributes
        )
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
                    metadata=metadata,
                    token_start=c.token_start,
                    token_end=c.token_end,
                    ingested_at_ms=ingested_at,
                )
            )
            for c in chunks
        ]

    async def delete(self, doc_id: str, trace_id: str = "") -> bool:
        """Publishes a deletion for a known document; False if the id is unknown."""
        if await self.registry.get(doc_id) is None:
            return False
        event = events_pb2.KnowledgeEvent(
            deleted=events_pb2.DocumentDeleted(header=new_header("ingest", trace_id), doc_id=doc_id)
        )
        await self.publish([(self.chunk_topic, doc_id.encode(), event.SerializeToString())])
        await self.registry.delete(doc_id)
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
