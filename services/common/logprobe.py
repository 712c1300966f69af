"""Is a record still in the log? The check behind log-reset detection.

The embedded broker (Tansu) is memory-only: a restart starts every partition again at offset 0,
with no error to a client that reads at an offset the new log has not reached yet (it just gets
nothing) and, once the new log is long enough, other records at the old offsets. Its end
offsets cannot tell either: after batched writes it reports the base offset of the last batch
(measured: 6 for a partition of 55 records), so they are only a lower bound.

What does tell is the record itself: a consumer remembers the offset and timestamp of the last
record it processed (a :class:`Fingerprint`); if the log no longer has a record at that offset,
or has one with another timestamp, the log was reset. Timestamps are the producer's (CreateTime),
kept by the broker, and our producers set them explicitly where a fingerprint is taken from a
send.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fingerprint:
    offset: int
    timestamp_ms: int = -1  # -1: not known (only whether a record is at that offset is checked)

    def encode(self) -> str:
        return f"{self.offset}:{self.timestamp_ms}"

    @classmethod
    def decode(cls, raw: bytes | str | None) -> Fingerprint | None:
        if not raw:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        offset, _, ts = text.partition(":")
        try:
            return cls(int(offset), int(ts))
        except ValueError:
            return None


class Probe(Enum):
    INTACT = "intact"  # the record is there, with the same timestamp
    GONE = "gone"  # no record at that offset, or another one: the log was reset
    UNKNOWN = "unknown"  # the broker could not be asked (down, restarting)


class LogProbe:
    """A consumer outside any group that reads single records by offset. Fetches are kept
    small (one batch is enough) and short (an empty answer comes after ``wait_ms``)."""

    def __init__(self, bootstrap: str, client_id: str, wait_ms: int = 300):
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.wait_ms = wait_ms
        self._consumer: AIOKafkaConsumer | None = None
        # One check at a time: checks from a rebalance and from the poll loop would otherwise
        # seek the same client under each other and read nothing.
        self._lock = asyncio.Lock()

    async def _client(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id=f"{self.client_id}-probe",
                group_id=None,
                enable_auto_commit=False,
                # Past the end, real Kafka answers OFFSET_OUT_OF_RANGE: reset, and the record
                # read then has another offset, which reads as "gone" as it should.
                auto_offset_reset="earliest",
                fetch_max_wait_ms=100,
                max_partition_fetch_bytes=256 * 1024,
                request_timeout_ms=5_000,
            )
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()  # else it is left half-started (and warned about)
                raise
            self._consumer = consumer
        return self._consumer

    async def check(self, tp: TopicPartition, fp: Fingerprint) -> Probe:
        async with self._lock:
            return await self._locked_check(tp, fp)

    async def _locked_check(self, tp: TopicPartition, fp: Fingerprint) -> Probe:
        try:
            consumer = await self._client()
            return await self._check(consumer, tp, fp)
        except (KafkaError, OSError) as exc:
            log.info("log probe of %s[%d] failed: %r", tp.topic, tp.partition, exc)
            await self.close()  # a fresh client next time: this one may hold a dead connection
            return Probe.UNKNOWN

    async def _check(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, fp: Fingerprint
    ) -> Probe:
        if not await self._has_partition(consumer, tp):
            return Probe.GONE  # the topic or the partition is gone: so is the record
        # A lower bound: past it, the record is certainly there, and an empty read means a slow
        # broker (CPU contention), not a short log. Only "gone" triggers a full re-read, so an
        # empty read below the bound is asked once more, for longer, before it counts.
        end = int((await consumer.end_offsets([tp]))[tp])
        found = await self._read(consumer, tp, fp.offset, self.wait_ms)
        if found is None and end > fp.offset:
            return Probe.UNKNOWN
        if found is None:
            # Only a fresh client's empty read counts: one that lived through a broker restart
            # may still fetch with what it knew of the old broker. (The endless re-reads once
            # blamed on such reads came from _has_partition's metadata, fixed there.)
            await self.close()
            consumer = await self._client()
            if not await self._has_partition(consumer, tp):
                return Probe.GONE
            found = await self._read(consumer, tp, fp.offset, 4 * self.wait_ms)
        if found is None:
            return Probe.GONE
        if fp.timestamp_ms < 0:
            return Probe.INTACT
        return Probe.INTACT if found == fp else Probe.GONE

    async def _has_partition(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> bool:
        partitions = consumer.partitions_for_topic(tp.topic)
        if partitions is None or tp.partition not in partitions:
            # A manually assigned client keeps metadata of its assigned topic only (aiokafka's
            # assign() calls set_topics), so refreshing it cannot tell about another topic:
            # a probe shared by a consumer of several topics then read each of the others as
            # "gone", and the monitor and the trainer re-read every partition every check
            # (534 times in 13 minutes of the test suite, with no broker restart at all).
            cluster = await consumer._client.fetch_all_metadata()
            partitions = cluster.partitions_for_topic(tp.topic)
        return bool(partitions) and tp.partition in partitions  # type: ignore[operator]

    async def _read(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, wait_ms: int
    ) -> Fingerprint | None:
        if consumer.assignment() != {tp}:
            consumer.assign([tp])
        consumer.seek(tp, offset)
        batch = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
        records = batch.get(tp, [])
        if not records or records[0].offset != offset:
            return None
        return Fingerprint(records[0].offset, records[0].timestamp)

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            try:
                await consumer.stop()
            except Exception:  # closing a client of a dead broker may fail; it is dropped anyway
                log.debug("closing the probe consumer failed", exc_info=True)
