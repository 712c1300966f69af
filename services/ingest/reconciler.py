"""The outbox's reconciler: publishes again what was accepted (or deleted) and never reached
retrieve, so an acknowledged document is searchable eventually whatever the broker loses.

Each round it looks at two things:

* **A log reset.** When a consumer of the knowledge path finds the broker's log reset (its
  plumbing marks it in Redis, :func:`services.common.keys.log_resets_key`), everything in the
  outbox published before that moment is published again at once.
* **Due entries.** An entry not applied ``ingest_check_after_s`` after its publication is
  looked up in the log: if its last record is gone (or another record is at its offset), it is
  published again; if it is still there it is waiting behind a backlog, and is looked at again
  later (published anyway after ``ingest_republish_anyway_s``, in case a consumer skipped it).

Publishing again waits until every consumer has had time to find the reset for itself (one
reset check and one group rejoin): a burst of republished records could otherwise carry a new
log past a consumer's stale position before it notices, and it would skip them.

Entries that retrieve has applied leave the outbox (a compare-and-delete: a newer version
accepted meanwhile stays). Publishing again is harmless: chunk ids are derived from the content
and retrieve applies a chunk once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from aiokafka import TopicPartition

from services.common.kafka import now_ms
from services.common.keys import log_resets_key
from services.common.logprobe import Fingerprint, Probe
from services.common.metrics import OUTBOX_PENDING, REPUBLISHED
from services.ingest.pipeline import IngestPipeline
from services.ingest.registry import Pending, RedisDocumentRegistry
from services.ingest.settings import IngestSettings

log = logging.getLogger(__name__)


class RecordProbe(Protocol):
    async def check(self, tp: TopicPartition, fp: Fingerprint) -> Probe: ...


@dataclass
class Round:
    settled: int = 0
    republished: int = 0
    waiting: int = 0


class Reconciler:
    def __init__(
        self,
        settings: IngestSettings,
        pipeline: IngestPipeline,
        registry: RedisDocumentRegistry,
        probe: RecordProbe,
        redis: aioredis.Redis,
    ):
        self.settings = settings
        self.pipeline = pipeline
        self.registry = registry
        self.probe = probe
        self.redis = redis
        # Resets of these topics lose what ingest published (the chunks, or their embeddings).
        self.topics = (settings.topic_chunks, settings.topic_embedded)
        self.seen_reset_ms = 0
        self.grace_s = settings.stream_reset_check_s + settings.kafka_session_timeout_ms / 1000
        self._signal_ms = 0  # the latest sign of a reset: a consumer's mark, or our own probe
        self._settling_since_ms = 0  # when the signs of the current settling period began

    async def run(self) -> None:
        while True:
            try:
                done = await self.round()
                if done.republished:
                    log.warning(
                        "reconciler published %d documents again",
                        done.republished,
                        extra={"settled": done.settled, "waiting": done.waiting},
                    )
            except Exception as exc:  # Redis or the broker away: the next round tries again
                log.warning("reconciler round failed: %r", exc)
            await asyncio.sleep(self.settings.ingest_reconcile_interval_s)

    async def round(self) -> Round:
        done = Round()
        reset_ms = await self._last_reset()
        self._signal(reset_ms)
        if reset_ms > self.seen_reset_ms and not self._settling():
            await self._after_reset(reset_ms, done)
            self.seen_reset_ms = reset_ms
            self._settling_since_ms = now_ms()  # marks still coming: act again 2 periods on
        ids = await self.registry.due(now_ms(), self.settings.ingest_reconcile_batch)
        for doc_id, state in zip(ids, await self.registry.pending(ids), strict=True):
            await self._look_at(doc_id, state, done)
        OUTBOX_PENDING.set(await self.registry.outbox_size())
        return done

    def _signal(self, at_ms: int) -> None:
        if at_ms > self._signal_ms and now_ms() - self._signal_ms >= self.grace_s * 1000:
            self._settling_since_ms = now_ms()  # a new period, not marks that keep coming
        self._signal_ms = max(self._signal_ms, at_ms)

    def _settling(self) -> bool:
        """A reset was seen less than the grace period ago: consumers may not all know yet.
        At most two grace periods in a row: marks that keep coming (a crash-looping broker,
        or a consumer that wrongly finds resets over and over, as the monitor once did) must
        not hold republishing for ever."""
        now, grace_ms = now_ms(), self.grace_s * 1000
        if now - self._settling_since_ms >= 2 * grace_ms:
            return False
        return now - self._signal_ms < grace_ms

    async def _last_reset(self) -> int:
        marks = await self.redis.hmget(  # type: ignore[misc]
            log_resets_key(self.settings.redis_prefix), list(self.topics)
        )
        return max((int(m) for m in marks if m), default=0)

    async def _after_reset(self, reset_ms: int, done: Round) -> None:
        ids = await self.registry.outbox(100_000)
        states = await self.registry.pending(ids)
        lost = [s for s in states if s is not None and s.published_at_ms <= reset_ms]
        log.warning(
            "the broker's log was reset: publishing %d unapplied documents again", len(lost)
        )
        for state in lost:
            if state.settled:
                await self.registry.settle(state.doc_id, state.content_hash)
                done.settled += 1
            elif await self.pipeline.republish(state.doc_id):
                REPUBLISHED.labels("log_reset").inc()
                done.republished += 1

    async def _look_at(self, doc_id: str, state: Pending | None, done: Round) -> None:
        if state is None:  # the registry entry is gone: nothing to deliver
            await self.registry.settle(doc_id, "")
            return
        if state.settled:
            await self.registry.settle(doc_id, state.content_hash)
            done.settled += 1
            return
        verdict = Probe.GONE
        if state.position is not None:
            tp = TopicPartition(self.settings.topic_chunks, state.position.partition)
            fp = Fingerprint(state.position.offset, state.position.timestamp_ms)
            verdict = await self.probe.check(tp, fp)
        waited_s = (now_ms() - state.published_at_ms) / 1000
        if verdict is Probe.GONE and state.position is not None:
            if self._signal_ms < state.published_at_ms:
                self._signal(now_ms())  # a reset no consumer has reported yet
            if self._settling():
                verdict = Probe.UNKNOWN  # publish once the consumers have caught up with it
        if verdict is Probe.GONE or (
            verdict is Probe.INTACT and waited_s > self.settings.ingest_republish_anyway_s
        ):
            if await self.pipeline.republish(doc_id):
                REPUBLISHED.labels("gone" if verdict is Probe.GONE else "waited").inc()
                done.republished += 1
            return
        # Still in the log (behind a backlog), or the broker cannot be asked now.
        later = self.settings.ingest_check_after_s
        if verdict is Probe.UNKNOWN:
            later = self.settings.ingest_reconcile_interval_s
        await self.registry.postpone(doc_id, now_ms() + int(later * 1000))
        done.waiting += 1
