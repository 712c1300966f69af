"""Retrieval quality on PubMedQA through the running stack: recall@1, recall@5 and MRR@10 of
``bm25``, ``dense`` and ``hybrid`` (corpus = each item's CONTEXTS, query = its QUESTION,
relevant = the item). Ingests the file first (a no-op for documents already indexed).

    .venv/bin/python -m bench.retrieval --data ../shared/data/pubmedqa/labeled.json --json

``--sweep`` also reports plain RRF and a grid of weighted-RRF weights, computed from the same
candidate lists, to show how the default weights were chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from knowstream.ingest.v1 import ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.cli.documents import pubmedqa_document
from services.common.clients import sync_channel
from services.common.settings import CommonSettings
from services.retrieve.fusion import weighted_rrf

MODES = {
    "bm25": retrieve_pb2.SEARCH_MODE_BM25,
    "dense": retrieve_pb2.SEARCH_MODE_DENSE,
    "hybrid": retrieve_pb2.SEARCH_MODE_HYBRID,
}


def doc_ranking(hits) -> list[str]:  # type: ignore[no-untyped-def]
    """Chunk hits collapsed to documents, best first."""
    seen: list[str] = []
    for h in hits:
        if h.doc_id not in seen:
            seen.append(h.doc_id)
    return seen


def metrics(rankings: list[list[str]], relevant: list[str]) -> dict[str, float]:
    n = len(relevant)
    r1 = sum(rel in r[:1] for r, rel in zip(rankings, relevant, strict=True)) / n
    r5 = sum(rel in r[:5] for r, rel in zip(rankings, relevant, strict=True)) / n
    mrr = (
        sum(
            1 / (r[:10].index(rel) + 1) if rel in r[:10] else 0
            for r, rel in zip(rankings, relevant, strict=True)
        )
        / n
    )
    return {"recall@1": round(r1, 4), "recall@5": round(r5, 4), "mrr@10": round(mrr, 4)}


def ensure_ingested(data: dict, settings: CommonSettings, timeout_s: float = 600) -> None:  # type: ignore[type-arg]
    ingest = ingest_pb2_grpc.IngestServiceStub(sync_channel(settings.address(settings.ingest_port)))
    docs = [pubmedqa_document(k, v) for k, v in data.items()]
    for i in range(0, len(docs), 200):
        ingest.IngestDocumentStream(iter(docs[i : i + 200]), timeout=120)
    search = retrieve_pb2_grpc.RetrieveServiceStub(
        sync_channel(settings.address(settings.retrieve_port))
    )
    deadline = time.monotonic() + timeout_s
    wanted = set(data)
    while time.monotonic() < deadline:
        missing = [
            d
            for d in wanted
            if not search.Search(
                retrieve_pb2.SearchRequest(
                    query="x",
                    k=1,
                    mode=retrieve_pb2.SEARCH_MODE_DENSE,
                    filters=retrieve_pb2.SearchFilters(doc_ids=[d]),
                ),
                timeout=10,
            ).hits
        ]
        stats = search.GetIndexStats(retrieve_pb2.GetIndexStatsRequest(), timeout=10)
        if not missing and stats.bm25_lag_chunks == 0:
            return
        wanted = set(missing) or wanted
        time.sleep(2)
    raise TimeoutError(f"{len(wanted)} documents not searchable after {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.retrieval")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--candidates", type=int, default=50)
    args = parser.parse_args(argv)
    settings = CommonSettings()
    data = json.loads(args.data.read_text(encoding="utf-8"))
    ensure_ingested(data, settings)
    stub = retrieve_pb2_grpc.RetrieveServiceStub(
        sync_channel(settings.address(settings.retrieve_port))
    )
    ids = list(data)
    filters = retrieve_pb2.SearchFilters(sources=["pubmedqa"])
    rankings: dict[str, list[list[str]]] = {m: [] for m in MODES}
    for pmid in ids:
        for mode, code in MODES.items():
            reply = stub.Search(
                retrieve_pb2.SearchRequest(
                    query=data[pmid]["QUESTION"], k=args.candidates, mode=code, filters=filters
                ),
                timeout=30,
            )
            rankings[mode].append(doc_ranking(reply.hits))
    result: dict[str, object] = {m: metrics(rankings[m], ids) for m in MODES}
    if args.sweep:
        sweep = {}
        for wd, wb in [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (1, 1.5), (1.5, 1)]:
            fused = [
                [d for d, _ in weighted_rrf([dr, br], [wd, wb])]
                for dr, br in zip(rankings["dense"], rankings["bm25"], strict=True)
            ]
            sweep[f"dense{wd}:bm25{wb}"] = metrics(fused, ids)
        result["sweep_doc_level_rrf"] = sweep
    result["n"] = len(ids)
    if not args.json:
        for mode in MODES:
            print(f"{mode:>7}: {result[mode]}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
