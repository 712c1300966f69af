"""Documents as the CLI sends them: PubMedQA items as documents, and ingesting a labelled file
until its abstracts are searchable (eval, train and the benchmarks share it)."""

from __future__ import annotations

import time

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2


def pubmedqa_document(pmid: str, item: dict) -> ingest_pb2.Document:  # type: ignore[type-arg]
    """A PubMedQA item as a document: its id is the PubMed id, its text the joined CONTEXTS.
    The question is not part of the document (it would leak the evaluation query)."""
    return ingest_pb2.Document(
        id=str(pmid),
        text="\n".join(item["CONTEXTS"]),
        metadata=events_pb2.DocumentMetadata(
            source="pubmedqa", domain="medicine", tags=item.get("MESHES", [])[:32]
        ),
    )


def ensure_ingested(
    data: dict, ingest: ingest_pb2_grpc.IngestServiceStub, retrieve, timeout_s: float
) -> int:  # type: ignore[type-arg]
    """Ingests the file's abstracts (a no-op for those already indexed with the same content)
    and waits until the new ones are searchable; returns how many were new."""
    docs = [pubmedqa_document(k, v) for k, v in data.items()]
    reply = ingest.IngestDocumentStream(iter(docs), timeout=max(60.0, timeout_s))
    if reply.rejected:
        bad = [r for r in reply.results if r.error][:3]
        raise ValueError(f"{reply.rejected} abstracts were rejected: {bad}")
    new = [r.id for r in reply.results if r.status == ingest_pb2.INGEST_STATUS_ACCEPTED]
    waiting = set(new)
    deadline = time.monotonic() + timeout_s
    while waiting:
        for doc_id in list(waiting):
            hits = retrieve.Search(
                retrieve_pb2.SearchRequest(
                    query=data[doc_id]["QUESTION"],
                    k=1,
                    filters=retrieve_pb2.SearchFilters(doc_ids=[doc_id]),
                ),
                timeout=10,
            ).hits
            if hits:
                waiting.discard(doc_id)
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} abstracts not searchable after {timeout_s:.0f}s")
        if waiting:
            time.sleep(1)
    return len(new)
