"""The chunk stream: embeds chunk events in micro-batches (one poll of the consumer plumbing).

Workers of the same consumer group share the chunk topic's partitions. Records are processed in
partition order and re-emitted keyed by document id, so a document's deletion stays ordered with
its chunks. Outputs are acknowledged by the broker before the inputs' offsets can be committed
(at-least-once; retrieve is idempotent by chunk id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, ConsumerRecord

from knowstream.events.v1 import events_pb2
from services.common.consumer import Rejects, StreamConsumer
from services.common.kafka import BadEvent, new_header, parse_knowledge_event
from services.common.metrics import EVENTS_PRODUCED
from services.common.tracing import kafka_headers
from services.embed.settings import EmbedSettings

log = logging.getLogger(__name__)

EmbedFn = Callable[[list[str]], Awaitable[np.ndarray]]


def embedding_text(chunk: events_pb2.ChunkEvent) -> str:
    """What gets embedded: the title gives a chunk its context."""
    return f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text


async def process_batch(
    values: list[tuple[bytes | None, bytes | None]], embed: EmbedFn, model: str
) -> tuple[list[tuple[bytes, bytes, str]], list[tuple[int, str]]]:
    """Pure step of the agent: (key, value) records in, (key, value, trace id) outputs and
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
    return [(k, e.SerializeToString(), _trace_of(e)) for _, k, e in outputs], rejects


def _trace_of(event: events_pb2.KnowledgeEvent) -> str:
    kind = event.WhichOneof("kind")
    return getattr(event, kind).header.trace_id if kind else ""


class ChunkStream:
    """The handler of the chunk topic: embeds a poll's chunks, sends the embedded chunks (and
    deletions) and waits for the broker's acks before the plumbing commits the inputs."""

    def __init__(
        self, settings: EmbedSettings, embed: EmbedFn, model: str, producer: AIOKafkaProducer
    ):
        self.settings = settings
        self.embed = embed
        self.model = model
        self.producer = producer

    async def handle(self, records: list[ConsumerRecord]) -> Rejects:
        outputs, rejects = await process_batch(
            [(r.key, r.value) for r in records], self.embed, self.model
        )
        topic = self.settings.topic_embedded
        # Each output on its own chunk's trace: one poll may hold chunks of several requests.
        futures = [
            await self.producer.send(topic, v, key=k, headers=kafka_headers(t))
            for k, v, t in outputs
        ]
        await asyncio.gather(*futures)
        EVENTS_PRODUCED.labels("embed", topic).inc(len(outputs))
        return [(records[i], reason) for i, reason in rejects]


def build_stream(
    settings: EmbedSettings,
    embed: EmbedFn,
    model: str,
    producer: AIOKafkaProducer,
    redis: aioredis.Redis | None,
) -> StreamConsumer:
    handler = ChunkStream(settings, embed, model, producer)
    return StreamConsumer(
        settings,
        "embed",
        settings.embed_group,
        {settings.topic_chunks: handler.handle},
        producer=producer,
        redis=redis,
        max_records=settings.embed_stream_batch,
        # A short poll: a micro-batch goes as soon as the records that have arrived are read.
        poll_timeout_ms=max(1, int(settings.embed_stream_wait_s * 1000)),
    )
