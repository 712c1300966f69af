"""Publishing events off the request path, and what to do with a record that can never be sent.

A record larger than the producer's or the broker's limit fails the same way on every attempt:
retrying it would block every event queued behind it for ever. :func:`unsendable` recognises
those errors; :class:`EventPublisher` (and the audit log) put such a record, cut to fit, on the
topic's dead-letter topic with the reason and go on with the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError
from prometheus_client import Counter

from services.common.kafka import DeadLetterSink
from services.common.metrics import EVENTS_PRODUCED
from services.common.settings import CommonSettings
from services.common.tracing import kafka_headers

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

EVENTS_DROPPED = Counter("ks_events_dropped_total", "Events dropped (publisher queue full)")
UNSENDABLE = Counter(
    "ks_events_unsendable_total", "Records too large to send, dead-lettered instead", ["topic"]
)

# The producer raises the first before sending; the broker answers with the others.
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


def unsendable(exc: BaseException) -> bool:
    """Whether sending the same record again can never succeed (it is too large)."""
    return isinstance(exc, _TOO_LARGE)


async def drop_unsendable(
    sink: DeadLetterSink, topic: str, key: bytes | None, value: bytes, exc: BaseException
) -> None:
    """Dead-letters a record that can never be sent, with the reason; never raises (a dead
    letter that fails too is logged and the record is gone)."""
    reason = (
        f"record of {len(value)} bytes can never be sent to {topic} "
        f"({type(exc).__name__}: {exc}); the limit is {sink.settings.kafka_max_record_bytes} "
        "bytes (KS_KAFKA_MAX_RECORD_BYTES)"
    )
    UNSENDABLE.labels(topic).inc()
    try:
        await sink.send(topic, reason, value, key)
    except Exception as dlq_exc:
        log.error(
            "dropped a record for %s: %s; its dead letter failed too: %s", topic, reason, dlq_exc
        )


class EventPublisher:
    """Publishes events from a background task so that a slow or absent broker never delays or
    fails an answer. The queue is bounded; beyond it events are dropped and counted. A failed
    send is retried, except one that can never succeed (dead-lettered, see above)."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        settings: CommonSettings,
        service: str,
        max_queued: int = 10_000,
        retry_s: float = 1.0,
    ):
        self.producer = producer
        self.service = service
        self.retry_s = retry_s
        self.dead_letters = DeadLetterSink(producer, settings, service)
        self.queue: asyncio.Queue[tuple[str, bytes, bytes, Headers]] = asyncio.Queue(max_queued)
        self._drops: set[asyncio.Task[Any]] = set()

    def publish(self, topic: str, key: str, message: Any) -> None:
        # The trace is taken now: the task that sends has none.
        value, headers = message.SerializeToString(), kafka_headers(message.header.trace_id)
        try:
            self.queue.put_nowait((topic, key.encode(), value, headers))
        except asyncio.QueueFull:
            EVENTS_DROPPED.inc()
            log.warning("event queue full; dropped an event for %s", topic)

    async def run(self) -> None:
        while True:
            topic, key, value, headers = await self.queue.get()
            await self._send(topic, key, value, headers)
            self.queue.task_done()

    async def _send(self, topic: str, key: bytes, value: bytes, headers: Headers) -> None:
        while True:
            try:
                delivery = await self.producer.send(topic, value, key=key, headers=headers)
            except Exception as exc:
                if unsendable(exc):  # the producer's own size check
                    await drop_unsendable(self.dead_letters, topic, key, value, exc)
                    return
                log.warning("publishing to %s failed (%s); retrying", topic, exc)
                await asyncio.sleep(self.retry_s)
                continue
            EVENTS_PRODUCED.labels(self.service, topic).inc()
            # The broker's answer comes later; one refusing the record as too large is final.
            delivery.add_done_callback(lambda d: self._delivered(d, topic, key, value))
            return

    def _delivered(
        self, delivery: asyncio.Future[Any], topic: str, key: bytes, value: bytes
    ) -> None:
        if delivery.cancelled() or delivery.exception() is None:
            return
        exc = delivery.exception()
        assert exc is not None
        if unsendable(exc):
            self._spawn(drop_unsendable(self.dead_letters, topic, key, value, exc))
        else:
            log.warning("an event for %s was not delivered: %s", topic, exc)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def drain(self, timeout_s: float = 5) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.producer.flush()
        if self._drops:
            await asyncio.wait(list(self._drops), timeout=max(0.1, deadline - time.monotonic()))
