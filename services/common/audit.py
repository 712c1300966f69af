"""The audit trail: admin RPCs as AuditEvents on ``ks.audit``.

The server interceptor (services/common/authz.py) records; :class:`AuditLog` publishes from a
bounded queue in a background task, so an absent broker never delays or fails the RPC it
records (beyond the queue, events are dropped and counted, and that is logged). A service that
has a producer hands it over with :meth:`AuditLog.use`; any other (the trainer, ingest) gets a
small producer of its own, started on the first event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from google.protobuf.message import Message
from prometheus_client import Counter

from knowstream.events.v1 import events_pb2
from services.common.kafka import DeadLetterSink, make_producer
from services.common.metrics import EVENTS_PRODUCED
from services.common.publisher import drop_unsendable, unsendable
from services.common.settings import CommonSettings
from services.common.tracing import kafka_headers

log = logging.getLogger(__name__)

AUDIT_DROPPED = Counter("ks_audit_dropped_total", "Audit events dropped (queue full)")
SUMMARY_CHARS = 1000


def summarize(message: Message, limit: int = SUMMARY_CHARS) -> str:
    """One line naming the set fields; bytes as their length (an upload's chunks are MBs)."""
    text = _fields(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields(message: Message) -> str:
    parts = []
    for fd, value in message.ListFields():
        if fd.is_repeated and not fd.message_type:
            shown = [_scalar(v) for v in list(value)[:5]]
            extra = f", +{len(value) - 5}" if len(value) > 5 else ""
            parts.append(f"{fd.name}: [{', '.join(shown)}{extra}]")
        elif fd.is_repeated:
            parts.append(f"{fd.name}: <{len(value)} items>")
        elif fd.message_type:
            parts.append(f"{fd.name} {{{_fields(value)}}}")
        else:
            parts.append(f"{fd.name}: {_scalar(value)}")
    return " ".join(parts)


def _scalar(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return repr(value[:200])
    return str(value)


class AuditLog:
    def __init__(self, settings: CommonSettings, service: str, max_queued: int = 10_000):
        self.settings = settings
        self.service = service
        self.queue: asyncio.Queue[events_pb2.AuditEvent] = asyncio.Queue(max_queued)
        self._producer: AIOKafkaProducer | None = None
        self._own = True
        self._started = False

    def use(self, producer: AIOKafkaProducer) -> None:
        """Publish through the service's producer (it starts and stops it)."""
        self._producer, self._own, self._started = producer, False, True

    def record(self, event: events_pb2.AuditEvent) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            AUDIT_DROPPED.inc()
            log.warning("audit queue full; dropped the event of %s", event.method)

    async def _producer_started(self) -> AIOKafkaProducer:
        while self._producer is None or not self._started:
            try:
                if self._producer is None:
                    self._producer = make_producer(self.settings, f"{self.service}-audit")
                await self._producer.start()
                self._started = True
            except Exception as exc:
                log.warning("audit producer cannot start (%s); retrying", exc)
                if self._producer is not None:
                    with contextlib.suppress(Exception):
                        await self._producer.stop()
                self._producer = None
                await asyncio.sleep(1)
        return self._producer

    async def run(self) -> None:
        """Never raises: a failing audit sink must not stop the service (it is logged)."""
        while True:
            event = await self.queue.get()
            value, key = event.SerializeToString(), (event.who or "-").encode()
            while True:
                producer = await self._producer_started()
                try:
                    await producer.send_and_wait(
                        self.settings.topic_audit,
                        value,
                        key=key,
                        headers=kafka_headers(event.header.trace_id),
                    )
                    EVENTS_PRODUCED.labels(self.service, self.settings.topic_audit).inc()
                    break
                except Exception as exc:
                    if unsendable(exc):  # too large: retrying would block the trail for ever
                        sink = DeadLetterSink(producer, self.settings, self.service)
                        await drop_unsendable(sink, self.settings.topic_audit, key, value, exc)
                        break
                    log.warning("publishing an audit event failed (%s); retrying", exc)
                    await asyncio.sleep(1)
            self.queue.task_done()

    async def close(self, timeout_s: float = 5) -> None:
        try:
            await asyncio.wait_for(self.queue.join(), timeout_s)
        except TimeoutError:
            log.warning("%d audit events not published at shutdown", self.queue.qsize())
        if self._own and self._producer is not None and self._started:
            await self._producer.stop()
