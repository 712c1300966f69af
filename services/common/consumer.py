"""The one consumer plumbing: every Kafka consumer of knowstream (embed, retrieve, monitor, the
trainer's agents through :mod:`services.common.streams`, ingest's raw topic) is a
:class:`StreamConsumer` with a handler per topic.

What it does for all of them:

* **At-least-once.** A poll's records go to the topic's handler; offsets are committed after it
  returns (and after the dead letters it asked for are acknowledged). Handlers are idempotent.
* **Log resets.** The embedded broker is memory-only: a restart starts every log again at 0 and
  a consumer at offset 525 would wait, silently, for a record the new log reaches much later,
  skipping everything before it. On every assignment and every ``stream_reset_check_s`` the
  last record processed is looked up in the log (:mod:`services.common.logprobe`); when it is
  gone the partition is read again from the start, which is safe because every handler is
  idempotent. The reset is also marked in Redis, where ingest's reconciler sees it.
* **Poison records.** A handler error that is a dependency being down (Redis, the broker, a
  service) is retried for as long as it lasts; the stream is then stalled, and says so. Any
  other error is retried ``stream_retries`` times, then the batch is handled record by record
  and the record that still fails goes to the dead-letter topic with the error as the reason:
  one bad record never stops a partition.
* **Lag and health.** Per-partition lag is a Prometheus gauge; a partition with records
  waiting and none processed for ``stream_stall_s`` is stalled, the readiness check fails (the
  service turns NOT_SERVING) and the reason is published in Redis for ``knowstream status``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, UnknownError

from services.common.kafka import DeadLetterSink, make_consumer, now_ms
from services.common.keys import stream_status_key
from services.common.logprobe import LogProbe
from services.common.metrics import (
    CONSUMER_LAG,
    CONSUMER_STALLED,
    EVENTS_CONSUMED,
    RECORD_RETRIES,
)
from services.common.partitions import PartitionTracker, label
from services.common.resets import Positions, ResetGuard
from services.common.settings import CommonSettings
from services.common.tracing import on_trace, restore, trace_of_record
from services.common.tracing import use as use_trace

log = logging.getLogger(__name__)

# (record, reason) pairs a handler wants dead-lettered; the rest of its batch was handled.
Rejects = list[tuple[ConsumerRecord, str]]
Handler = Callable[[list[ConsumerRecord]], Awaitable[Rejects | None]]
MAX_BACKOFF_S = 30.0
_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def is_transient(exc: BaseException) -> bool:
    """A dependency that is down or busy, not a bad record: retried until it is back."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True  # BusyLoadingError (replaying the append-only file) is one of these
    # UnknownError (code -1) is the broker failing, not the record: a broker SIGKILLed under a
    # send answers it, without marking it retriable.
    if isinstance(exc, KafkaTimeoutError | KafkaConnectionError | UnknownError):
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in _UNAVAILABLE
    return isinstance(exc, ConnectionError | TimeoutError)


class StreamConsumer:
    def __init__(
        self,
        settings: CommonSettings,
        service: str,
        group: str,
        handlers: dict[str, Handler],
        *,
        producer: AIOKafkaProducer,
        redis: aioredis.Redis | None = None,
        positions: Positions | None = None,
        max_records: int = 256,
        poll_timeout_ms: int = 500,
        **consumer_options: Any,
    ):
        self.settings = settings
        self.service = service
        self.group = group
        self.handlers = handlers
        self.redis = redis
        self.positions = positions
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.consumer = make_consumer(settings, group, [], **consumer_options)
        self.dead_letters = DeadLetterSink(producer, settings, service)
        self.tracker = PartitionTracker(settings.stream_stall_s)
        self.started = asyncio.Event()
        self.name = group
        self.status_key = ""  # set by attach_stream: where the health detail is published
        self.guard = ResetGuard(
            settings,
            service,
            group,
            set(handlers),
            self.consumer,
            self.tracker,
            redis,
            positions,
            LogProbe(settings.kafka_bootstrap, f"{service}-{group}"),
        )
        self._stalled_logged: set[TopicPartition] = set()

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.guard.load_fingerprints()
        self.consumer.subscribe(list(self.handlers), listener=_Listener(self))
        await self.consumer.start()
        self.started.set()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.guard.probe.close()
        if self.redis is not None and self.status_key:
            try:
                await self.redis.hdel(self.status_key, self._status_field)  # type: ignore[misc]
            except redis.exceptions.RedisError:
                pass

    async def ready(self) -> bool:
        return self.started.is_set() and self.tracker.status().ok

    async def run(self) -> None:
        # Lag and health are measured beside the poll loop: a handler waiting for a dependency
        # keeps the loop busy, and that is exactly when the stall must be seen.
        watch = asyncio.ensure_future(self._watch())
        try:
            await self._poll()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            try:
                await self._measure()
            except Exception:  # a measurement is advisory; the next one may work
                log.exception("measuring lag failed")
            await asyncio.sleep(self.settings.stream_lag_interval_s)

    async def _poll(self) -> None:
        next_check = time.monotonic() + self.settings.stream_reset_check_s
        while True:
            now = time.monotonic()
            if now >= next_check:
                self.guard.due |= self.consumer.assignment()
                next_check = now + self.settings.stream_reset_check_s
            if self.guard.due:
                due, self.guard.due = self.guard.due, set()
                for tp in due & self.consumer.assignment():
                    await self.guard.check(tp)
            resets_before = dict(self.tracker.resets)
            try:
                batches = await self.consumer.getmany(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                )
            except KafkaError as exc:
                if not is_transient(exc):
                    raise
                log.info("poll failed (%r); polling again", exc)
                await asyncio.sleep(1)
                continue
            by_topic: dict[str, list[ConsumerRecord]] = {}
            for tp, records in batches.items():
                state = self.tracker.parts.get(tp)
                if records and state is None:
                    # Delivered before our rebalance listener ran: check it now.
                    self.tracker.assigned(tp, records[0].offset)
                    await self.guard.check(tp)
                elif records and state is not None and records[0].offset < state.next_offset:
                    # The position went back without a seek of ours: the client was told its
                    # offset is out of range (a shorter, reset log) and reset it. Confirm and
                    # reset the stored position too, before the handler skips what it holds.
                    await self.guard.check(tp, records[0].offset)
                if self.tracker.resets.get(tp, 0) != resets_before.get(tp, 0):
                    # Reset during this poll (a check above, or the rebalance listener inside
                    # getmany): the partition is read again from its start, so these records
                    # come again; handled now as well, each would be handled twice.
                    batches[tp] = []
                    continue
                by_topic.setdefault(tp.topic, []).extend(records)
            for topic, records in by_topic.items():
                EVENTS_CONSUMED.labels(self.service, topic).inc(len(records))
                await self._process(topic, records)
            await self._commit(batches)

    # -- handling ----------------------------------------------------------------------------
    async def _process(self, topic: str, records: list[ConsumerRecord]) -> None:
        # What the handler produces stays on its records' trace when they share one (a batch
        # that mixes traces carries them inside its events: see embed's stream).
        traces = {trace_of_record(r) for r in records}
        token = use_trace(on_trace(traces.pop()) if len(traces) == 1 else None)
        try:
            await self._handle(topic, records)
        finally:
            restore(token)

    async def _handle(self, topic: str, records: list[ConsumerRecord]) -> None:
        failures, delay = 0, self.settings.stream_retry_backoff_s
        while True:
            try:
                rejects = await self.handlers[topic](records) or []
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                self.tracker.last_error = error
                if not self._owned(records):
                    return  # revoked meanwhile: the new owner handles them
                if is_transient(exc):
                    RECORD_RETRIES.labels(self.service, topic, "unavailable").inc()
                    log.warning("%s: a dependency is down (%s); retrying", topic, error)
                else:
                    failures += 1
                    if failures > self.settings.stream_retries:
                        await self._isolate(topic, records, error, failures)
                        return
                    RECORD_RETRIES.labels(self.service, topic, "error").inc()
                    log.warning(
                        "%s: handler failed (%s); attempt %d of %d",
                        topic,
                        error,
                        failures,
                        self.settings.stream_retries + 1,
                        exc_info=failures == 1,
                    )
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
        for record, reason in rejects:
            await self._dead_letter(record, reason)

    async def _isolate(
        self, topic: str, records: list[ConsumerRecord], error: str, failures: int
    ) -> None:
        if len(records) > 1:
            # One by one, so that only the record that fails is set aside (the others were
            # perhaps handled already: handlers are idempotent).
            for record in records:
                await self._process(topic, [record])
            return
        await self._dead_letter(records[0], f"handler failed {failures} times: {error}")

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        delay = self.settings.stream_retry_backoff_s
        while True:
            try:
                await self.dead_letters.send_record(record, reason)
                return
            except KafkaError as exc:
                if not is_transient(exc):
                    raise
                log.warning("dead-lettering failed (%r); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)

    def _owned(self, records: list[ConsumerRecord]) -> bool:
        assigned = self.consumer.assignment()
        return any(TopicPartition(r.topic, r.partition) in assigned for r in records)

    async def _commit(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        assigned = self.consumer.assignment()
        offsets = {tp: rs[-1].offset + 1 for tp, rs in batches.items() if rs and tp in assigned}
        for tp, records in batches.items():
            if records and tp in assigned:
                self.tracker.processed(tp, records[-1].offset, records[-1].timestamp)
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # Rebalanced or broker away: the records come again to whoever owns them next.
            log.info("commit failed (%r); the records may be delivered again", exc)
        await self.guard.save_fingerprints(offsets)

    # -- lag and health ----------------------------------------------------------------------
    async def _measure(self) -> None:
        assigned = sorted(self.consumer.assignment() & set(self.tracker.parts))
        if assigned:
            try:
                ends = await self.consumer.end_offsets(assigned)
            except KafkaError as exc:
                log.debug("end offsets not available: %r", exc)
                ends = {}
            for tp in assigned:
                if tp not in ends:
                    continue
                end = max(int(ends[tp]), self.consumer.highwater(tp) or 0)
                state = self.tracker.observe_end(tp, end)
                if state is None:
                    continue
                labels = (self.service, self.group, tp.topic, str(tp.partition))
                CONSUMER_LAG.labels(*labels).set(state.lag)
                CONSUMER_STALLED.labels(*labels).set(int(state.stalled))
                if state.stalled and tp not in self._stalled_logged:
                    log.warning("%s is stalled: %s", label(tp), self.tracker.status().reason)
                    self._stalled_logged.add(tp)
                elif not state.stalled:
                    self._stalled_logged.discard(tp)
                if end < state.next_offset:
                    self.guard.due.add(tp)  # the log looks shorter than what was processed
        await self._publish_status()

    @property
    def _status_field(self) -> str:
        # Replicas in containers share an address (0.0.0.0:port): one field per process.
        return f"{self.name}@{socket.gethostname()}:{os.getpid()}"

    async def _publish_status(self) -> None:
        if self.redis is None or not self.status_key:
            return
        status = self.tracker.status().to_json() | {"at_ms": now_ms(), "group": self.group}
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.status_key, self._status_field, json.dumps(status))
            pipe.expire(self.status_key, int(3 * self.settings.stream_lag_interval_s) + 5)
            await pipe.execute()
        except redis.exceptions.RedisError:
            pass  # Redis down shows in the service's own redis check


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stream: StreamConsumer):
        self.stream = stream

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self.stream.tracker.revoked(tp)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Before any fetch: a stale position must not be read from.
        await self.stream.guard.assigned(set(assigned))


def attach_stream(app: Any, stream: StreamConsumer, name: str) -> None:
    """Runs ``stream`` inside a service's :class:`GrpcApp`: started after the hooks registered
    before it (producers, stores), a readiness check named ``name`` that fails while a partition
    is stalled, and its health detail published under the service's address."""
    stream.name = name
    stream.status_key = stream_status_key(stream.settings.redis_prefix, app.address)

    async def start() -> None:
        await stream.start()
        app.spawn(stream.run(), name)

    app.on_start(start)
    app.on_stop(stream.stop)
    app.add_check(name, stream.ready)
