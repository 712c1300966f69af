"""Ingest service: gRPC IngestService, the raw-documents topic consumer and the outbox's
reconciler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from aiokafka import AIOKafkaProducer, ConsumerRecord

from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common import redisutil
from services.common.consumer import Rejects, StreamConsumer, attach_stream, is_transient
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.grpcserver import service_app
from services.common.kafka import BadEvent, make_producer, now_ms
from services.common.logprobe import LogProbe
from services.common.metrics import EVENTS_PRODUCED
from services.common.models import load_tokenizer
from services.common.net import kafka_alive
from services.common.tracing import current_trace_id, new_trace, trace_of_record
from services.ingest.chunking import Chunker
from services.ingest.pipeline import IngestPipeline, Publish, RawInput, summarize
from services.ingest.raw import parse_raw_record
from services.ingest.reconciler import Reconciler
from services.ingest.registry import LogPosition, RedisDocumentRegistry
from services.ingest.settings import IngestSettings

log = logging.getLogger(__name__)
# GetIndexing: one Redis round trip per call for this many documents.
MAX_INDEXING_IDS = 1000


def trace_id_of(context: grpc.aio.ServicerContext) -> str:
    """The call's trace (the server interceptor set it from its traceparent, or a new one)."""
    return current_trace_id()


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, pipeline: IngestPipeline, max_batch: int):
        self.pipeline = pipeline
        self.max_batch = max_batch

    async def _ingest(
        self, docs: Sequence[ingest_pb2.Document], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.IngestDocumentsResponse:
        if not docs:
            raise InvalidArgument("no documents in the request")
        results = await self._pipeline_ingest([RawInput.from_proto(d) for d in docs], context)
        reply = summarize(results)
        if reply.rejected == len(results):
            errors = "; ".join(r.error for r in results[:5])
            raise InvalidArgument(f"no valid document in the request: {errors}")
        return reply

    async def _pipeline_ingest(
        self, inputs: list[RawInput], context: grpc.aio.ServicerContext
    ) -> list[ingest_pb2.DocumentResult]:
        try:
            return await self.pipeline.ingest(inputs, trace_id_of(context))
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Nothing was acknowledged: the client may retry (a version already recorded is
            # published again, never lost). UNAVAILABLE says so; INTERNAL would not.
            raise Unavailable(f"Redis or the broker is unavailable: {exc!r}") from exc

    async def IngestDocuments(
        self, request: ingest_pb2.IngestDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.IngestDocumentsResponse:
        if len(request.documents) > self.max_batch:
            raise InvalidArgument(
                f"{len(request.documents)} documents in one call; the limit is {self.max_batch} "
                "(use IngestDocumentStream for more)"
            )
        return await self._ingest(request.documents, context)

    async def IngestDocumentStream(
        self,
        request_iterator: AsyncIterator[ingest_pb2.Document],
        context: grpc.aio.ServicerContext,
    ) -> ingest_pb2.IngestDocumentsResponse:
        results: list[ingest_pb2.DocumentResult] = []
        batch: list[RawInput] = []

        async def flush() -> None:
            results.extend(await self._pipeline_ingest(batch, context))
            batch.clear()

        async for doc in request_iterator:
            batch.append(RawInput.from_proto(doc))
            if len(batch) >= 64:
                await flush()
        if batch:
            await flush()
        if not results:
            raise InvalidArgument("no documents in the stream")
        return summarize(results)

    async def DeleteDocument(
        self, request: ingest_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DeleteDocumentResponse:
        if not request.id:
            raise InvalidArgument("document id is required")
        if not await self.pipeline.delete(request.id, trace_id_of(context)):
            raise NotFound(f"document {request.id!r} not found")
        return ingest_pb2.DeleteDocumentResponse(id=request.id)

    async def GetDocument(
        self, request: ingest_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DocumentInfo:
        found = await self.pipeline.registry.get(request.id)
        if found is None:
            raise NotFound(f"document {request.id!r} not found")
        content_hash, chunks, at_ms = found
        return ingest_pb2.DocumentInfo(
            id=request.id, content_hash=content_hash, chunk_count=chunks, accepted_at_ms=at_ms
        )

    async def GetIndexing(
        self, request: ingest_pb2.GetIndexingRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetIndexingResponse:
        if len(request.ids) > MAX_INDEXING_IDS:
            raise InvalidArgument(
                f"{len(request.ids)} ids in one call; the limit is {MAX_INDEXING_IDS}"
            )
        known = await self.pipeline.registry.known(list(request.ids))
        return ingest_pb2.GetIndexingResponse(
            documents=[
                ingest_pb2.DocumentIndexing(
                    id=doc_id, accepted_hash=k.accepted or "", searchable_hash=k.active or ""
                )
                for doc_id, k in zip(request.ids, known, strict=True)
            ]
        )


class RawDocuments:
    """The raw-documents topic's handler: records go through the same pipeline as gRPC (and so
    through the outbox before their offsets are committed). Bad records and invalid documents
    go to the dead-letter topic; the records around them are still ingested; a redelivery is
    answered "unchanged"."""

    def __init__(self, pipeline: IngestPipeline):
        self.pipeline = pipeline

    async def handle(self, records: list[ConsumerRecord]) -> Rejects:
        rejects: Rejects = []
        parsed = []
        for record in records:
            try:
                parsed.append((record, parse_raw_record(record.value, record.headers)))
            except BadEvent as exc:
                rejects.append((record, str(exc)))
        # One ingest per trace, so each record's chunks carry its producer's traceparent; the
        # records without one share a new trace.
        untraced = new_trace().trace_id
        by_trace: dict[str, list[tuple[ConsumerRecord, RawInput]]] = {}
        for record, raw in parsed:
            by_trace.setdefault(trace_of_record(record) or untraced, []).append((record, raw))
        for trace_id, group in by_trace.items():
            results = await self.pipeline.ingest([p for _, p in group], trace_id)
            for (record, _), result in zip(group, results, strict=True):
                if result.status == ingest_pb2.INGEST_STATUS_REJECTED:
                    rejects.append((record, result.error))
        return rejects


def log_publisher(producer: AIOKafkaProducer) -> Publish:
    """Sends the pipeline's records and answers where each landed in the log."""

    async def publish(records: Sequence[tuple[str, bytes, bytes]]) -> list[LogPosition]:
        # Timestamps set here: the outbox keeps them, and the reconciler recognises its records
        # in the log by offset and timestamp (the producer's metadata reports a batch's).
        at = now_ms()
        futures = [
            await producer.send(topic, value, key=key, timestamp_ms=at)
            for topic, key, value in records
        ]
        sent = await asyncio.gather(*futures)
        for topic, _, _ in records:
            EVENTS_PRODUCED.labels("ingest", topic).inc()
        return [LogPosition(m.partition, m.offset, at) for m in sent]

    return publish


def build_pipeline(
    settings: IngestSettings, registry: RedisDocumentRegistry, publish: Publish
) -> IngestPipeline:
    chunker = Chunker(
        load_tokenizer(settings.embed_model),
        settings.ingest_chunk_tokens,
        settings.ingest_chunk_overlap,
    )
    return IngestPipeline(
        chunker,
        registry,
        publish,
        settings.topic_chunks,
        settings.ingest_max_document_bytes,
        settings.ingest_check_after_s,
    )


async def main() -> None:
    settings = IngestSettings()
    app = service_app("ingest", settings, settings.ingest_port, settings.ingest_metrics_port)
    redis = redisutil.connect(settings.redis_url)
    producer = make_producer(settings, "ingest")
    registry = RedisDocumentRegistry(redis, settings.redis_prefix)
    pipeline = build_pipeline(settings, registry, log_publisher(producer))
    probe = LogProbe(settings.kafka_bootstrap, "ingest-reconciler")
    reconciler = Reconciler(settings, pipeline, registry, probe, redis)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(
        IngestServicer(pipeline, settings.ingest_max_batch), app.server
    )
    app.add_service(ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name)
    raw = StreamConsumer(
        settings,
        "ingest",
        settings.ingest_raw_group,
        {settings.topic_raw_documents: RawDocuments(pipeline).handle},
        producer=producer,
        redis=redis,
    )

    async def start() -> None:
        await producer.start()
        app.spawn(reconciler.run(), "reconciler")

    async def stop() -> None:
        await probe.close()
        await producer.flush()
        await producer.stop()
        await redis.aclose()

    app.on_start(start)
    app.on_stop(stop)
    attach_stream(app, raw, "raw-documents")
    app.add_check("redis", lambda: redisutil.ping(redis))
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    await app.serve()
