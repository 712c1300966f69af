"""Search latency through the running stack at 10k and 100k chunks.

Synthetic chunks (sentences of PubMedQA abstracts recombined, with random unit vectors) are
written straight to the embedded-chunks topic, as embed would write them, until the index holds
the target count; queries are PubMedQA questions, each asked once per size (so the query
embedding cache does not flatter the figures), in hybrid mode with k=10. The synthetic documents
are deleted at the end.

    .venv/bin/python -m bench.search --json [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

import numpy as np

from bench.common import load_pubmedqa, percentiles, stubs
from knowstream.embed.v1 import embed_pb2, embed_pb2_grpc
from knowstream.events.v1 import events_pb2
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common.clients import sync_channel
from services.common.kafka import make_producer, new_header, now_ms
from services.common.settings import CommonSettings

CHUNKS_PER_DOC = 5


async def produce(
    settings: CommonSettings,
    start: int,
    count: int,
    tag: str,
    sentences: list[str],
    dim: int,
    model: str,
) -> None:
    rng = np.random.default_rng(start)
    producer = make_producer(settings, "bench-search", linger_ms=50)
    await producer.start()
    try:
        pending = []
        for n in range(start, start + count):
            doc, idx = divmod(n, CHUNKS_PER_DOC)
            doc_id = f"syn-{tag}-{doc}"
            vec = rng.normal(size=dim).astype(np.float32)
            vec /= np.linalg.norm(vec)
            text = " ".join(sentences[(n * 7 + j) % len(sentences)] for j in range(4))
            chunk = events_pb2.ChunkEvent(
                header=new_header("bench"),
                doc_id=doc_id,
                content_hash=tag * 4,
                chunk_id=f"{doc_id}#{tag}#{idx}",
                chunk_index=idx,
                chunk_count=CHUNKS_PER_DOC,
                text=text,
                metadata=events_pb2.DocumentMetadata(source="synthetic"),
                ingested_at_ms=now_ms(),
            )
            event = events_pb2.KnowledgeEvent(
                embedded=events_pb2.EmbeddedChunk(
                    header=new_header("bench"), chunk=chunk, vector=vec.tolist(), model=model
                )
            )
            pending.append(
                await producer.send(
                    settings.topic_embedded, event.SerializeToString(), key=doc_id.encode()
                )
            )
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def delete_docs(settings: CommonSettings, tag: str, docs: int) -> None:
    producer = make_producer(settings, "bench-search", linger_ms=50)
    await producer.start()
    try:
        futures = []
        for doc in range(docs):
            doc_id = f"syn-{tag}-{doc}"
            event = events_pb2.KnowledgeEvent(
                deleted=events_pb2.DocumentDeleted(header=new_header("bench"), doc_id=doc_id)
            )
            futures.append(
                await producer.send(
                    settings.topic_embedded, event.SerializeToString(), key=doc_id.encode()
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.search")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def grow_index(
    settings: CommonSettings,
    retrieve: retrieve_pb2_grpc.RetrieveServiceStub,
    start: int,
    count: int,
    target: int,
    tag: str,
    sentences: list[str],
    dim: int,
    model: str,
) -> tuple[retrieve_pb2.IndexStats, float]:
    """Writes ``count`` synthetic chunks (numbered from ``start``) and waits until the index
    holds ``target`` chunks with BM25 caught up: the index stats then, and the seconds it took."""
    t = time.time()
    asyncio.run(produce(settings, start, count, tag, sentences, dim, model))
    while True:
        now = retrieve.GetIndexStats(retrieve_pb2.GetIndexStatsRequest(), timeout=10)
        if now.chunks >= target and now.bm25_lag_chunks == 0:
            break
        if time.time() - t > 1800:
            raise TimeoutError(f"index reached {now.chunks} of {target} chunks")
        time.sleep(1)
    return now, time.time() - t


def search_latencies(
    retrieve: retrieve_pb2_grpc.RetrieveServiceStub,
    questions: list[str],
    size: int,
    tag: str,
    queries: int,
) -> dict[str, list[float]]:
    """Milliseconds per search (client and server, with the server's parts) at this index size,
    then again with the query embeddings cached."""
    # Each question once per size, made unique to this run so that the first pass pays for
    # the query embedding (the retrieve service caches it); the second pass repeats the same
    # strings and so measures the index alone.
    offset = (size // 1000) % len(questions)
    qs = [f"{questions[(offset + i) % len(questions)]} [{tag}/{size}]" for i in range(queries)]
    parts: dict[str, list[float]] = {
        k: []
        for k in (
            "client_ms",
            "server_ms",
            "embed_ms",
            "dense_ms",
            "bm25_ms",
            "cached_client_ms",
            "cached_server_ms",
        )
    }
    for q in qs:
        start = time.perf_counter()
        reply = retrieve.Search(retrieve_pb2.SearchRequest(query=q, k=10), timeout=10)
        parts["client_ms"].append((time.perf_counter() - start) * 1000)
        parts["server_ms"].append(reply.total_ms)
        parts["embed_ms"].append(reply.embed_ms)
        parts["dense_ms"].append(reply.dense_ms)
        parts["bm25_ms"].append(reply.bm25_ms)
    for q in qs:
        start = time.perf_counter()
        reply = retrieve.Search(retrieve_pb2.SearchRequest(query=q, k=10), timeout=10)
        parts["cached_client_ms"].append((time.perf_counter() - start) * 1000)
        parts["cached_server_ms"].append(reply.total_ms)
    return parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = CommonSettings()
    data = load_pubmedqa()
    sentences = [s for v in data.values() for c in v["CONTEXTS"] for s in c.split(". ") if s]
    questions = [v["QUESTION"] for v in data.values()]
    _, retrieve = stubs(settings)
    stats = retrieve.GetIndexStats(retrieve_pb2.GetIndexStatsRequest(), timeout=10)
    # Synthetic vectors must match the index: ask the embed service which model it runs.
    info = embed_pb2_grpc.EmbedServiceStub(
        sync_channel(settings.address(settings.embed_port))
    ).GetModelInfo(embed_pb2.GetModelInfoRequest(), timeout=10)
    dim, model = info.dimension, info.model
    tag = uuid.uuid4().hex[:8]
    added = 0
    result: dict[str, object] = {}
    for size in sorted(int(s) for s in args.sizes.split(",")):
        need = max(0, size - int(stats.chunks) - added)
        need -= need % CHUNKS_PER_DOC
        target = int(stats.chunks) + added + need
        now, load_s = grow_index(
            settings, retrieve, added, need, target, tag, sentences, dim, model
        )
        added += need
        parts = search_latencies(retrieve, questions, size, tag, args.queries)
        result[f"{size}"] = {
            "chunks": int(now.chunks),
            "load_s": round(load_s, 1),
            **{k: percentiles(v) for k, v in parts.items()},
        }
    asyncio.run(delete_docs(settings, tag, added // CHUNKS_PER_DOC))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
