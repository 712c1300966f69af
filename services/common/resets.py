"""Log-reset handling for the consumer plumbing: where each assigned partition starts, whether
the log still holds what was processed (:mod:`services.common.logprobe`), and what a reset
means (read from the start, forget stored positions, mark it in Redis for ingest's reconciler).

The last record processed per partition is also kept in Redis, so a consumer restarted after a
reset it did not see (retrieve, whose positions live in Redis with its data) still notices.
"""

from __future__ import annotations

import logging
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common.kafka import now_ms
from services.common.keys import log_resets_key, stream_fingerprints_key
from services.common.logprobe import Fingerprint, LogProbe, Probe
from services.common.metrics import LOG_RESETS
from services.common.partitions import PartitionTracker, label
from services.common.redisutil import text
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)


class Positions(Protocol):
    """Offsets a consumer keeps with its data instead of in Kafka (retrieve, in Redis)."""

    async def load(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def reset(self, tp: TopicPartition) -> None: ...


class ResetGuard:
    def __init__(
        self,
        settings: CommonSettings,
        service: str,
        group: str,
        topics: set[str],
        consumer: AIOKafkaConsumer,
        tracker: PartitionTracker,
        redis: aioredis.Redis | None,
        positions: Positions | None,
        probe: LogProbe,
    ):
        self.settings = settings
        self.service = service
        self.group = group
        self.topics = topics
        self.consumer = consumer
        self.tracker = tracker
        self.redis = redis
        self.positions = positions
        self.probe = probe
        self.due: set[TopicPartition] = set()  # partitions to check before the next poll

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        stored = await self.positions.load(partitions) if self.positions else {}
        for tp in sorted(partitions):
            start = stored.get(tp, 0)
            try:
                if tp in stored:
                    self.consumer.seek(tp, start)
                else:
                    start = await self.consumer.committed(tp) or 0
                self.tracker.assigned(tp, start)
                await self.check(tp, start)
            except Exception:
                # aiokafka drops a listener's error and the partitions after it: log it, keep
                # the partition tracked, and check it again in the run loop.
                log.exception("%s: checking the assigned partition failed", label(tp))
                if tp not in self.tracker.parts:
                    self.tracker.assigned(tp, start)
                self.due.add(tp)

    async def check(self, tp: TopicPartition, start: int | None = None) -> None:
        state = self.tracker.parts.get(tp)
        if state is None:
            return
        fp = state.fingerprint
        if start is None:
            start = state.next_offset
        if fp is None and start > 0:
            fp = Fingerprint(start - 1)  # whether that record exists is all we can ask
        if fp is None:
            return
        resets = self.tracker.resets.get(tp, 0)
        verdict = await self.probe.check(tp, fp)
        # A check from the rebalance and one from the poll loop may both find the same reset.
        if verdict is Probe.GONE and self.tracker.resets.get(tp, 0) == resets:
            await self.reset(tp, fp, start)

    async def reset(self, tp: TopicPartition, fp: Fingerprint, start: int) -> None:
        log.warning(
            "%s: the record at offset %d is no longer in the log (the broker lost its data); "
            "reading the partition again from the start",
            label(tp),
            fp.offset,
            extra={"topic": tp.topic, "partition": tp.partition, "position": start},
        )
        LOG_RESETS.labels(self.service, tp.topic).inc()
        self.tracker.reset(tp)
        if self.positions is not None:
            await self.positions.reset(tp)
        await self.consumer.seek_to_beginning(tp)
        if self.redis is not None:
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hset(log_resets_key(self.settings.redis_prefix), tp.topic, now_ms())
                pipe.hdel(self._fingerprints_key, f"{tp.topic}:{tp.partition}")
                await pipe.execute()
            except redis.exceptions.RedisError as exc:
                log.warning("could not record the log reset in Redis: %r", exc)

    @property
    def _fingerprints_key(self) -> str:
        return stream_fingerprints_key(self.settings.redis_prefix, self.group)

    async def load_fingerprints(self) -> None:
        if self.redis is None:
            return
        try:
            raw = await self.redis.hgetall(self._fingerprints_key)  # type: ignore[misc]
        except redis.exceptions.RedisError as exc:
            log.warning("stream fingerprints not loaded (%r): positions are only checked", exc)
            return
        for field, value in raw.items():
            topic, _, partition = text(field).rpartition(":")
            fp = Fingerprint.decode(value)
            if fp is not None and topic in self.topics and partition.isdigit():
                self.tracker.fingerprints[TopicPartition(topic, int(partition))] = fp

    async def save_fingerprints(self, offsets: dict[TopicPartition, int]) -> None:
        if self.redis is None:
            return
        mapping: dict[str | bytes, str] = {
            f"{tp.topic}:{tp.partition}": fp.encode()
            for tp in offsets
            if (fp := self.tracker.fingerprints.get(tp)) is not None
        }
        try:
            await self.redis.hset(self._fingerprints_key, mapping=mapping)  # type: ignore[misc,arg-type]
        except redis.exceptions.RedisError as exc:
            # Advisory: without it a restarted consumer only checks that its position exists.
            log.debug("fingerprints not saved: %r", exc)
