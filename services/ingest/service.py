"""Ingest service: gRPC IngestService plus the raw-documents topic consumer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from aiokafka import AIOKafkaConsumer

from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common import redisutil
from services.common.grpcserver import service_app
from services.common.kafka import (
    BadEvent,
    DeadLetterSink,
    make_consumer,
    make_producer,
)
from services.common.metrics import EVENTS_CONSUMED, EVENTS_PRODUCED
from services.common.models import load_tokenizer
from services.common.net import kafka_alive
from services.ingest.chunking import Chunker
from services.ingest.pipeline import IngestPipeline, RawInput, summarize
from services.ingest.raw import parse_raw_record
from services.ingest.registry import RedisDocumentRegistry
from services.ingest.settings import IngestSettings

log = logging.getLogger(__name__)


def trace_id_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return ""


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, pipeline: IngestPipeline, max_batch: int):
        self.pipeline = pipeline
        self.max_batch = max_batch

    async def _ingest(
        self, docs: Sequence[ingest_pb2.Document], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.IngestDocumentsResponse:
        if not docs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no documents in the request")
        results = await self.pipeline.ingest(
            [RawInput.from_proto(d) for d in docs], trace_id_of(context)
        )
        reply = summarize(results)
        if reply.rejected == len(results):
            errors = "; ".join(r.error for r in results[:5])
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"no valid document in the request: {errors}"
            )
        return reply

    async def IngestDocuments(self, request, context):  # type: ignore[no-untyped-def]
        if len(request.documents) > self.max_batch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.documents)} documents in one call; the limit is {self.max_batch} "
                "(use IngestDocumentStream for more)",
            )
        return await self._ingest(request.documents, context)

    async def IngestDocumentStream(
        self, request_iterator: AsyncIterator[ingest_pb2.Document], context
    ):  # type: ignore[no-untyped-def]
        results: list[ingest_pb2.DocumentResult] = []
        batch: list[RawInput] = []

        async def flush() -> None:
            results.extend(await self.pipeline.ingest(batch, trace_id_of(context)))
            batch.clear()

        async for doc in request_iterator:
            batch.append(RawInput.from_proto(doc))
            if len(batch) >= 64:
                await flush()
        if batch:
            await flush()
        if not results:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no documents in the stream")
        return summarize(results)

    async def DeleteDocument(self, request, context):  # type: ignore[no-untyped-def]
        if not request.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "document id is required")
        if not await self.pipeline.delete(request.id, trace_id_of(context)):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"document {request.id!r} not found")
        return ingest_pb2.DeleteDocumentResponse(id=request.id)

    async def GetDocument(self, request, context):  # type: ignore[no-untyped-def]
        found = await self.pipeline.registry.get(request.id)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"document {request.id!r} not found")
        assert found is not None
        content_hash, chunks, at_ms = found
        return ingest_pb2.DocumentInfo(
            id=request.id, content_hash=content_hash, chunk_count=chunks, accepted_at_ms=at_ms
        )


class RawDocumentConsumer:
    """Feeds the raw-documents topic through the same pipeline as gRPC. Bad records and invalid
    documents go to the dead-letter topic; the records around them are still ingested. Offsets
    are committed only after a batch is published (at-least-once; the content-hash dedup makes
    a redelivery a no-op)."""

    def __init__(
        self, consumer: AIOKafkaConsumer, pipeline: IngestPipeline, dead_letters: DeadLetterSink
    ):
        self.consumer = consumer
        self.pipeline = pipeline
        self.dead_letters = dead_letters

    async def run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=500, max_records=256)
            for tp, records in batches.items():
                EVENTS_CONSUMED.labels("ingest", tp.topic).inc(len(records))
                parsed = []
                for record in records:
                    try:
                        parsed.append((record, parse_raw_record(record.value, record.headers)))
                    except BadEvent as exc:
                        await self.dead_letters.send_record(record, str(exc))
                if parsed:
                    results = await self.pipeline.ingest([p for _, p in parsed])
                    for (record, _), result in zip(parsed, results, strict=True):
                        if result.status == ingest_pb2.INGEST_STATUS_REJECTED:
                            await self.dead_letters.send_record(record, result.error)
                # Commit exactly what was handled: the consumer's position may be further on.
                await self.consumer.commit({tp: records[-1].offset + 1})


async def main() -> None:
    settings = IngestSettings()
    app = service_app("ingest", settings, settings.ingest_port, settings.ingest_metrics_port)
    redis = redisutil.connect(settings.redis_url)
    producer = make_producer(settings, "ingest")

    async def publish(records: Sequence[tuple[str, bytes, bytes]]) -> None:
        futures = [await producer.send(topic, value, key=key) for topic, key, value in records]
        await asyncio.gather(*futures)
        for topic, _, _ in records:
            EVENTS_PRODUCED.labels("ingest", topic).inc()

    chunker = Chunker(
        load_tokenizer(settings.embed_model),
        settings.ingest_chunk_tokens,
        settings.ingest_chunk_overlap,
    )
    pipeline = IngestPipeline(
        chunker,
        RedisDocumentRegistry(redis, settings.redis_prefix, settings.ingest_inflight_s),
        publish,
        settings.topic_chunks,
        settings.ingest_max_document_bytes,
    )
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(
        IngestServicer(pipeline, settings.ingest_max_batch), app.server
    )
    app.add_service(ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name)
    consumer = make_consumer(settings, settings.ingest_raw_group, [settings.topic_raw_documents])

    async def start() -> None:
        await producer.start()
        await consumer.start()
        raw = RawDocumentConsumer(consumer, pipeline, DeadLetterSink(producer, settings, "ingest"))
        app.spawn(raw.run(), "raw-documents")

    async def stop() -> None:
        await consumer.stop()
        await producer.flush()
        await producer.stop()
        await redis.aclose()

    app.on_start(start)
    app.on_stop(stop)
    app.add_check("redis", lambda: redisutil.ping(redis))
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    await app.serve()
