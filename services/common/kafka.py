"""Kafka clients, topic administration, event envelopes and dead-lettering.

Delivery is at-least-once everywhere: the embedded broker rejects idempotent producers and
transactions, so producers run with ``enable_idempotence=False`` and every consumer is idempotent
(keyed writes in Redis) instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from google.protobuf.message import Message

from knowstream.events.v1 import events_pb2
from services.common.errors import InvalidArgument
from services.common.metrics import DEAD_LETTERS, EVENTS_PRODUCED
from services.common.settings import CommonSettings
from services.common.tracing import (
    current_trace_id,
    kafka_headers,
    trace_of_record,
    with_trace_header,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class BadEvent(InvalidArgument):
    """A record that cannot be processed; its message is the dead-letter reason."""


def new_header(producer: str, trace_id: str = "") -> events_pb2.EventHeader:
    """A new event's header; its trace is the current one (services/common/tracing.py) unless
    ``trace_id`` names another."""
    return events_pb2.EventHeader(
        schema_version=SCHEMA_VERSION,
        event_id=uuid.uuid4().hex,
        produced_at_ms=now_ms(),
        producer=producer,
        trace_id=trace_id or current_trace_id(),
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def check_header(header: events_pb2.EventHeader, what: str) -> None:
    if header.schema_version != SCHEMA_VERSION:
        raise BadEvent(
            f"{what}: unsupported schema_version {header.schema_version} "
            f"(this consumer reads {SCHEMA_VERSION})"
        )


M = TypeVar("M", bound=Message)


def parse_event(value: bytes | None, cls: type[M]) -> M:
    """Decodes a record and checks its header, or raises :class:`BadEvent` with the reason."""
    name = cls.DESCRIPTOR.name
    if not value:
        raise BadEvent("empty record value")
    event = cls()
    try:
        event.ParseFromString(value)
    except Exception as exc:  # protobuf raises DecodeError and, for some inputs, others
        raise BadEvent(f"not a {name} protobuf: {exc}") from exc
    if not event.HasField("header"):  # type: ignore[arg-type]
        raise BadEvent(f"{name} without a header")
    check_header(event.header, name)  # type: ignore[attr-defined]
    return event


def parse_knowledge_event(value: bytes | None) -> events_pb2.KnowledgeEvent:
    """Decodes and validates a record of the chunk topics, or raises :class:`BadEvent`."""
    if not value:
        raise BadEvent("empty record value")
    event = events_pb2.KnowledgeEvent()
    try:
        event.ParseFromString(value)
    except Exception as exc:  # protobuf raises DecodeError and, for some inputs, others
        raise BadEvent(f"not a KnowledgeEvent protobuf: {exc}") from exc
    kind = event.WhichOneof("kind")
    if kind is None:
        raise BadEvent("KnowledgeEvent has no payload")
    inner = getattr(event, kind)
    check_header(inner.header, kind)
    if kind == "embedded":
        check_header(inner.chunk.header, "embedded.chunk")
        if not inner.chunk.chunk_id or not inner.chunk.doc_id:
            raise BadEvent("embedded chunk without doc_id/chunk_id")
    elif kind == "chunk" and (not inner.chunk_id or not inner.doc_id):
        raise BadEvent("chunk without doc_id/chunk_id")
    elif kind == "deleted" and not inner.doc_id:
        raise BadEvent("deletion without doc_id")
    return event


class TracingProducer(AIOKafkaProducer):  # type: ignore[misc]
    """Every record it sends carries the current trace's ``traceparent`` header, unless the
    caller passed one (a record produced for another trace than the task's)."""

    async def send(  # type: ignore[no-untyped-def]
        self, topic, value=None, key=None, partition=None, timestamp_ms=None, headers=None
    ):
        return await super().send(
            topic, value, key, partition, timestamp_ms, with_trace_header(headers)
        )


def make_producer(settings: CommonSettings, client_id: str, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        max_request_size=settings.kafka_max_record_bytes,
    )
    options.update(overrides)
    return TracingProducer(**options)


def make_consumer(
    settings: CommonSettings, group_id: str, topics: Iterable[str], **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        client_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_partition_fetch_bytes=settings.kafka_max_record_bytes,
        fetch_max_bytes=4 * settings.kafka_max_record_bytes,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def knowledge_topics(settings: CommonSettings) -> dict[str, int]:
    """Every topic of the knowledge path and its partition count."""
    topics = [settings.topic_raw_documents, settings.topic_chunks, settings.topic_embedded]
    return {t: settings.topic_partitions for t in topics} | {settings.dlq(t): 1 for t in topics}


def serving_topics(settings: CommonSettings) -> dict[str, int]:
    """Topics of the serving path. Inference and feedback events feed the monitor and the
    trainer, which dead-letter what they cannot read; adapter events are an audit log."""
    topics = [settings.topic_inference, settings.topic_shadow, settings.topic_feedback]
    return (
        {t: settings.topic_partitions for t in topics}
        | {settings.dlq(t): 1 for t in topics}
        | {settings.topic_adapters: 1}
    )


def drift_topics(settings: CommonSettings) -> dict[str, int]:
    """Topics of the monitor's output. Retrain requests can also come from people and tools, so
    their consumer (the trainer) dead-letters what it cannot read."""
    return {
        settings.topic_drift_windows: 1,
        settings.topic_retrain: 1,
        settings.dlq(settings.topic_retrain): 1,
        settings.topic_knowledge_gaps: 1,
    }


def training_topics(settings: CommonSettings) -> dict[str, int]:
    """The trainer's events: one partition, so a job's events stay in order."""
    return {settings.topic_training: 1}


def audit_topics(settings: CommonSettings) -> dict[str, int]:
    """The audit trail: one partition, so `knowstream audit` reads it in order."""
    return {settings.topic_audit: 1}


def all_topics(settings: CommonSettings) -> dict[str, int]:
    return (
        knowledge_topics(settings)
        | serving_topics(settings)
        | drift_topics(settings)
        | training_topics(settings)
        | audit_topics(settings)
    )


async def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 30) -> list[str]:
    """Creates the missing topics with the given partition counts; returns those it created.

    Explicit creation matters: the embedded broker would otherwise auto-create a topic on first
    use with its own default of 4 partitions.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in missing]
    finally:
        await admin.close()


# What a dead letter keeps of a record too large to send: the letter itself has to fit.
DEAD_LETTER_KEPT_BYTES = 64 * 1024


def fitted(value: bytes, reason: str, max_record_bytes: int) -> tuple[bytes, str]:
    """The value and reason a dead letter carries: the value cut to its first 64 KiB when the
    whole would not fit in a record (the reason says so)."""
    if len(value) <= max_record_bytes - DEAD_LETTER_KEPT_BYTES:
        return value, reason
    kept = value[:DEAD_LETTER_KEPT_BYTES]
    return kept, f"{reason} [value cut to its first {len(kept)} of {len(value)} bytes]"


class DeadLetterSink:
    """Writes records that a consumer rejected to ``<topic>.dlq`` with the reason."""

    def __init__(self, producer: AIOKafkaProducer, settings: CommonSettings, consumer: str):
        self.producer = producer
        self.settings = settings
        self.consumer = consumer

    async def send(
        self,
        topic: str,
        reason: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int = -1,
        offset: int = -1,
        trace_id: str = "",
    ) -> None:
        value, reason = fitted(value or b"", reason, self.settings.kafka_max_record_bytes)
        letter = events_pb2.DeadLetter(
            header=new_header(self.consumer, trace_id),
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            key=key or b"",
            value=value,
            reason=reason,
            consumer=self.consumer,
        )
        dlq = self.settings.dlq(topic)
        await self.producer.send_and_wait(
            dlq,
            letter.SerializeToString(),
            key=key,
            headers=[("reason", reason.encode()[:1000]), *kafka_headers(letter.header.trace_id)],
        )
        DEAD_LETTERS.labels(self.consumer, topic).inc()
        EVENTS_PRODUCED.labels(self.consumer, dlq).inc()
        log.warning(
            "dead-lettered record",
            extra={"topic": topic, "partition": partition, "offset": offset, "reason": reason},
        )

    async def send_record(self, record: ConsumerRecord, reason: str) -> None:
        # The letter stays on the trace of the record it sets aside.
        await self.send(
            record.topic,
            reason,
            record.value,
            record.key,
            record.partition,
            record.offset,
            trace_of_record(record),
        )
