"""Helpers shared by the benchmarks."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np

from knowstream.ingest.v1 import ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common.clients import sync_channel
from services.common.settings import REPO_ROOT, CommonSettings

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "pubmedqa" / "labeled.json"


def log(message: str) -> None:
    """Progress for the reader; stdout is kept for the JSON result."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_pubmedqa(path: Path = DEFAULT_DATA) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))


def stubs(settings: CommonSettings):  # type: ignore[no-untyped-def]
    return (
        ingest_pb2_grpc.IngestServiceStub(sync_channel(settings.address(settings.ingest_port))),
        retrieve_pb2_grpc.RetrieveServiceStub(
            sync_channel(settings.address(settings.retrieve_port))
        ),
    )


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {
        "p50": round(float(np.percentile(arr, 50)), 4),
        "p99": round(float(np.percentile(arr, 99)), 4),
        "n": len(values),
    }


def chunk_hits(  # type: ignore[no-untyped-def]
    retrieve, doc_ids: list[str], per_call: int = 20, timeout_s: float = 15
) -> dict[str, list[str]]:
    """The chunk ids Search returns now for each of these documents (dense, an exact scan over
    the doc-id filter), ``per_call`` documents a call so that their chunks fit in k=100."""
    chunks: dict[str, list[str]] = {}
    for i in range(0, len(doc_ids), per_call):
        reply = retrieve.Search(
            retrieve_pb2.SearchRequest(
                query="document",
                k=100,
                mode=retrieve_pb2.SEARCH_MODE_DENSE,
                filters=retrieve_pb2.SearchFilters(doc_ids=doc_ids[i : i + per_call]),
            ),
            timeout=timeout_s,
        )
        for hit in reply.hits:
            chunks.setdefault(hit.doc_id, []).append(hit.chunk_id)
    return chunks


def searchable(retrieve, doc_ids: list[str]) -> set[str]:  # type: ignore[no-untyped-def]
    """Which of these documents Search returns now."""
    return set(chunk_hits(retrieve, doc_ids, per_call=40, timeout_s=10))
