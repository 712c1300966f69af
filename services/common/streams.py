"""faust wiring shared by the stream processors (embed's chunk stream, the monitor): the app
with the embedded broker's constraints, dead-lettering from an agent, crash tracking, and the
start/stop/readiness hooks that tie a faust app to a service's :class:`GrpcApp`."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

from knowstream.events.v1 import events_pb2
from services.common.grpcserver import GrpcApp
from services.common.kafka import MAX_RECORD_BYTES, new_header
from services.common.metrics import DEAD_LETTERS
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)


class StreamHealth:
    """faust restarts a crashed agent after a pause; until it runs again, health says so."""

    def __init__(self) -> None:
        self.crashed_at: float | None = None
        self.last_error = ""
        self.started = asyncio.Event()

    def crashed(self, exc: BaseException) -> None:
        self.crashed_at = time.monotonic()
        self.last_error = repr(exc)

    def healthy(self, window_s: float = 15.0) -> bool:
        return self.crashed_at is None or time.monotonic() - self.crashed_at > window_s


def make_faust_app(settings: CommonSettings, group_id: str) -> faust.App:
    return faust.App(
        group_id,
        broker=[f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")],
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        store="memory://",
        # The embedded broker has no transactions or idempotent producers: at-least-once.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.kafka_heartbeat_interval_ms / 1000,
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=settings.topic_partitions,
        producer_max_request_size=MAX_RECORD_BYTES,
        consumer_max_fetch_size=MAX_RECORD_BYTES,
    )


async def dead_letter(dlq: Any, message: Any, reason: str, consumer: str) -> Any:
    """Sends a consumed faust message to its dead-letter topic with the reason; returns the
    send future (await it before the input's offset may be committed)."""
    letter = events_pb2.DeadLetter(
        header=new_header(consumer),
        source_topic=message.topic,
        source_partition=message.partition,
        source_offset=message.offset,
        key=message.key or b"",
        value=message.value or b"",
        reason=reason,
        consumer=consumer,
    )
    future = await dlq.send(
        key=message.key,
        value=letter.SerializeToString(),
        headers={"reason": reason.encode()[:1000]},
    )
    DEAD_LETTERS.labels(consumer, message.topic).inc()
    log.warning(
        "dead-lettered record",
        extra={
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "reason": reason,
        },
    )
    return future


def attach(app: GrpcApp, stream_app: faust.App, health: StreamHealth, name: str) -> None:
    """Runs the faust app inside the service: started after the gRPC port is bound, a readiness
    check named ``name``, and a stop that commits processed offsets and flushes the producer."""

    async def start() -> None:
        async def run_stream() -> None:
            await stream_app.start()
            health.started.set()
            # faust supervises its own agents; this task only notices when it has crashed.
            while not stream_app.should_stop:
                await asyncio.sleep(1)
            raise RuntimeError("faust app stopped")

        app.spawn(run_stream(), name)

    async def stop() -> None:
        await stream_app.stop()

    async def ready() -> bool:
        return health.started.is_set() and health.healthy()

    app.on_start(start)
    app.on_stop(stop)
    app.add_check(name, ready)
