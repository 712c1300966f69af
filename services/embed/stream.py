"""The chunk stream: a faust agent that embeds chunk events in micro-batches.

Workers of the same consumer group share the chunk topic's partitions. Records are processed in
partition order and re-emitted keyed by document id, so a document's deletion stays ordered with
its chunks. Outputs are acknowledged by the broker before the inputs' offsets can be committed
(at-least-once; retrieve is idempotent by chunk id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import numpy as np

from knowstream.events.v1 import events_pb2
from services.common.kafka import BadEvent, new_header, parse_knowledge_event
from services.common.metrics import EVENTS_CONSUMED, EVENTS_PRODUCED
from services.common.streams import StreamHealth, dead_letter, make_faust_app
from services.embed.settings import EmbedSettings

log = logging.getLogger(__name__)

EmbedFn = Callable[[list[str]], Awaitable[np.ndarray]]


def embedding_text(chunk: events_pb2.ChunkEvent) -> str:
    """What gets embedded: the title gives a chunk its context."""
    return f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text


async def process_batch(
    values: list[tuple[bytes | None, bytes | None]], embed: EmbedFn, model: str
) -> tuple[list[tuple[bytes, bytes]], list[tuple[int, str]]]:
    """Pure step of the agent: (key, value) records in, (key, value) outputs and
    (index, reason) rejects out, in input order."""
    outputs: list[tuple[int, bytes, events_pb2.KnowledgeEvent]] = []
    rejects: list[tuple[int, str]] = []
    to_embed: list[tuple[int, events_pb2.ChunkEvent]] = []
    for i, (key, value) in enumerate(values):
        try:
            event = parse_knowledge_event(value)
        except BadEvent as exc:
            rejects.append((i, str(exc)))
            continue
        kind = event.WhichOneof("kind")
        if kind == "chunk":
            to_embed.append((i, event.chunk))
        elif kind == "deleted":
            outputs.append((i, key or event.deleted.doc_id.encode(), event))
        else:
            rejects.append((i, f"unexpected {kind} event on the chunk topic"))
    if to_embed:
        vectors = await embed([embedding_text(c) for _, c in to_embed])
        for (i, chunk), vector in zip(to_embed, vectors, strict=True):
            embedded = events_pb2.EmbeddedChunk(
                header=new_header("embed", chunk.header.trace_id),
                chunk=chunk,
                vector=vector.tolist(),
                model=model,
            )
            outputs.append((i, chunk.doc_id.encode(), events_pb2.KnowledgeEvent(embedded=embedded)))
    outputs.sort(key=lambda o: o[0])
    return [(k, e.SerializeToString()) for _, k, e in outputs], rejects


def build_app(
    settings: EmbedSettings, embed: EmbedFn, model: str, health: StreamHealth | None = None
) -> faust.App:
    health = health or StreamHealth()
    app = make_faust_app(settings, settings.embed_group)
    chunks = app.topic(settings.topic_chunks, key_type=bytes, value_type=bytes)
    embedded = app.topic(settings.topic_embedded, key_type=bytes, value_type=bytes)
    dlq = app.topic(settings.dlq(settings.topic_chunks), key_type=bytes, value_type=bytes)

    @app.agent(chunks, concurrency=1)
    async def embed_chunks(stream: Any) -> None:
        try:
            await _consume(stream)
        except Exception as exc:
            health.crashed(exc)
            raise

    async def _consume(stream: Any) -> None:
        async for batch in stream.take_events(
            settings.embed_stream_batch, within=settings.embed_stream_wait_s
        ):
            EVENTS_CONSUMED.labels("embed", settings.topic_chunks).inc(len(batch))
            outputs, rejects = await process_batch(
                [(e.message.key, e.message.value) for e in batch], embed, model
            )
            futures = [await embedded.send(key=k, value=v) for k, v in outputs]
            for i, reason in rejects:
                futures.append(await dead_letter(dlq, batch[i].message, reason, "embed"))
            # Wait for the broker's acks before faust may commit the inputs' offsets.
            await asyncio.gather(*futures)
            EVENTS_PRODUCED.labels("embed", settings.topic_embedded).inc(len(outputs))

    return app
