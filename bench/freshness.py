"""Freshness through the running stack: seconds from an IngestDocuments ack until Search returns
the document, at a steady rate; the maximum sustained rate; and the embedding model's in-process
throughput measured in the same run, as the ceiling the pipeline is compared with.

    .venv/bin/python -m bench.freshness --json [--rate 20] [--duration 15]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid

from bench.common import load_pubmedqa, percentiles, searchable, stubs
from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2
from services.common.embedding import Embedder
from services.common.models import load_tokenizer, resolve_model_dir
from services.common.settings import CommonSettings
from services.embed.settings import EmbedSettings
from services.ingest.chunking import Chunker


def make_docs(texts: list[str], n: int, tag: str) -> list[ingest_pb2.Document]:
    # A unique first line makes each document new content (no dedup) of realistic size.
    return [
        ingest_pb2.Document(
            id=f"{tag}-{i}",
            text=f"Run {tag} item {i}.\n{texts[i % len(texts)]}",
            metadata=events_pb2.DocumentMetadata(source="bench-freshness"),
        )
        for i in range(n)
    ]


def in_process_ceiling(texts: list[str], settings: CommonSettings, n: int = 96) -> dict:
    """Chunks/s of the embedding model in this process, on the pipeline's own chunks."""
    chunker = Chunker(load_tokenizer(settings.embed_model))
    chunks = [c.text for t in texts for c in chunker.chunk(t)][:n]
    embed = EmbedSettings()
    # The same model, runtime and micro-batch shape as the embed service.
    embedder = Embedder(
        resolve_model_dir(embed.embed_model),
        embed.embed_model,
        embed.embed_max_tokens,
        embed.embed_forward_batch,
        embed.embed_bf16,
        embed.embed_threads or None,
        embed.embed_runtime,
        embed.cache_dir,
    )
    embedder.embed(chunks[:8])
    start = time.perf_counter()
    embedder.embed(chunks)
    rate = len(chunks) / (time.perf_counter() - start)
    per_doc = sum(len(chunker.chunk(t)) for t in texts) / len(texts)
    return {
        "chunks_per_s": round(rate, 2),
        "chunks_per_doc": round(per_doc, 3),
        "docs_per_s": round(rate / per_doc, 2),
    }


def steady(ingest, retrieve, docs, rate: float) -> dict:  # type: ignore[no-untyped-def]
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() or len(seen) < len(acked):
            outstanding = [d for d in list(acked) if d not in seen]
            if outstanding:
                now = time.time()
                for d in searchable(retrieve, outstanding):
                    seen[d] = now
            time.sleep(0.1)  # polling itself loads retrieve: keep it light
            if done.is_set() and time.time() - last_ack[0] > 600:
                return

    last_ack = [time.time()]
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    for i, doc in enumerate(docs):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        reply = ingest.IngestDocuments(
            ingest_pb2.IngestDocumentsRequest(documents=[doc]), timeout=30
        )
        acked[doc.id] = reply.results[0].acked_at_ms / 1000
        last_ack[0] = time.time()
    offered = len(docs) / (time.perf_counter() - start)
    done.set()
    poller.join()
    lat = [seen[d] - acked[d] for d in acked if d in seen]
    return {
        "offered_docs_per_s": round(offered, 2),
        "latency_s": percentiles(lat),
        "missing": len(acked) - len(lat),
    }


def max_sustained(ingest, retrieve, docs) -> dict:  # type: ignore[no-untyped-def]
    """Offers a burst and measures how fast the pipeline drains it."""
    start = time.time()
    ingest.IngestDocuments(ingest_pb2.IngestDocumentsRequest(documents=docs), timeout=120)
    ids = [d.id for d in docs]
    found: set[str] = set()
    while len(found) < len(ids) and time.time() - start < 900:
        found |= searchable(retrieve, [d for d in ids if d not in found])
        time.sleep(0.2)
    elapsed = time.time() - start
    return {
        "docs": len(ids),
        "seconds": round(elapsed, 2),
        "docs_per_s": round(len(found) / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.freshness")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--burst", type=int, default=120)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = CommonSettings()
    texts = ["\n".join(v["CONTEXTS"]) for v in load_pubmedqa().values()]
    ingest, retrieve = stubs(settings)
    tag = uuid.uuid4().hex[:6]

    ceiling = in_process_ceiling(texts, settings)
    burst = max_sustained(ingest, retrieve, make_docs(texts, args.burst, f"burst{tag}"))
    pipeline_chunks_per_s = burst["docs_per_s"] * ceiling["chunks_per_doc"]
    n = int(args.rate * args.duration)
    at_rate = steady(ingest, retrieve, make_docs(texts, n, f"r{tag}"), args.rate)
    result = {
        "in_process_embedding": ceiling,
        "max_sustained": burst,
        "pipeline_vs_in_process": round(pipeline_chunks_per_s / ceiling["chunks_per_s"], 3),
        f"steady_{args.rate:g}_docs_per_s": at_rate,
    }
    # Freshness below the ceiling: near it queues build up (waiting grows like u / (1 - u)).
    for share in (0.8, 0.5):
        rate = round(share * burst["docs_per_s"], 2)
        docs = make_docs(texts, max(10, int(rate * args.duration)), f"s{share}{tag}")
        result[f"steady_at_{share}x_max"] = steady(ingest, retrieve, docs, rate)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
