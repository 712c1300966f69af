"""The embedded-chunk handler: applies records to Redis (authoritative) and then to the
in-memory index.

Positions live in Redis with the data (:class:`StoredOffsets`): on (re)assignment the consumer
plumbing positions each partition at the offset stored with the chunks, not at the broker's
committed offset, so a crash between the two never loses or repeats a record (Kafka commits are
still made, for lag). The plumbing also finds a reset log and has it read again from the start.

A restarted Redis is the other way state can go back: with ``appendfsync everysec`` it may come
back up to a second behind what was applied. The in-memory index would then hold chunks Redis
lost and the consumer would be past them, so the next restart of this service would lose them.
When Redis's run id changes, the index is rebuilt from Redis and every partition is read again
from its stored offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from knowstream.events.v1 import events_pb2
from services.common.kafka import BadEvent, DeadLetterSink, now_ms, parse_knowledge_event
from services.common.metrics import INGEST_SEARCHABLE_LAG
from services.retrieve.index import HybridIndex
from services.retrieve.settings import RetrieveSettings
from services.retrieve.store import ChunkStore

log = logging.getLogger(__name__)


class StoredOffsets:
    """Where the plumbing finds (and resets) this consumer's positions."""

    def __init__(self, store: ChunkStore):
        self.store = store

    async def load(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        offsets = await self.store.offsets()
        return {tp: offsets[tp.partition] for tp in partitions if tp.partition in offsets}

    async def reset(self, tp: TopicPartition) -> None:
        await self.store.reset_offset(tp.partition)


class Indexer:
    def __init__(
        self,
        settings: RetrieveSettings,
        index: HybridIndex,
        store: ChunkStore,
        model: str,
    ):
        self.settings = settings
        self.index = index
        self.store = store
        self.model = model
        # Set by the service once the stream exists (they need each other).
        self.consumer: AIOKafkaConsumer | None = None
        self.dead_letters: DeadLetterSink | None = None
        self.pending: dict[str, events_pb2.EmbeddedChunk] = {}
        self.bm25_dirty = asyncio.Event()
        self.compacting = False
        self._compaction: asyncio.Future[None] | None = None
        self._redis_run_id = ""
        self._redis_restarted = False

    async def load(self) -> None:
        start = time.perf_counter()
        self.index.clear()
        self.pending.clear()
        chunks = await self.store.load_active()
        for i in range(0, len(chunks), 1000):
            self.index.add(chunks[i : i + 1000])
        await asyncio.to_thread(self.index.lexical.rebuild)
        log.info(
            "index rebuilt from Redis",
            extra={
                "chunks": len(self.index),
                "documents": self.index.documents,
                "seconds": round(time.perf_counter() - start, 2),
            },
        )

    def _check(self, event: events_pb2.KnowledgeEvent) -> None:
        if event.WhichOneof("kind") == "embedded":
            embedded = event.embedded
            if embedded.model != self.model:
                raise BadEvent(
                    f"embedded with model {embedded.model!r}; this index uses {self.model!r}"
                )
            if len(embedded.vector) != self.index.dimension:
                raise BadEvent(
                    f"vector has {len(embedded.vector)} dimensions; the index has "
                    f"{self.index.dimension}"
                )
        elif event.WhichOneof("kind") != "deleted":
            raise BadEvent(f"unexpected {event.WhichOneof('kind')} event on the embedded topic")

    async def handle(self, records: list[ConsumerRecord]) -> None:
        """The plumbing's handler: one poll's records, in order within each partition."""
        if self._redis_restarted:
            await self._resync()
            return  # the records come again from the stored offsets
        by_partition: dict[int, list[ConsumerRecord]] = {}
        for record in records:
            by_partition.setdefault(record.partition, []).append(record)
        offsets = await self.store.offsets()
        for partition, part in by_partition.items():
            await self._handle_partition(partition, part, offsets.get(partition, -1))

    async def _handle_partition(self, partition: int, records: list[Any], stored: int) -> None:
        assert self.dead_letters is not None
        good: list[tuple[int, int, events_pb2.KnowledgeEvent]] = []
        for record in records:
            if record.offset < stored:
                continue  # already applied before a restart or rebalance
            try:
                event = parse_knowledge_event(record.value)
                self._check(event)
            except BadEvent as exc:
                # Flush what came before, so offsets stay in order.
                await self._apply(good)
                good = []
                await self.dead_letters.send_record(record, str(exc))
                await self.store.advance(partition, record.offset)
                continue
            good.append((partition, record.offset, event))
        await self._apply(good)

    async def _apply(self, good: list[tuple[int, int, events_pb2.KnowledgeEvent]]) -> None:
        if not good:
            return
        for _, _, event in good:
            if event.WhichOneof("kind") == "embedded":
                self.pending[event.embedded.chunk.chunk_id] = event.embedded
        for applied in await self.store.apply(good):
            if applied.removed:
                self.index.remove(list(applied.removed))
                for chunk_id in applied.removed:
                    self.pending.pop(chunk_id, None)
                self.bm25_dirty.set()
            if applied.kind == "activated":
                await self._activate(applied.doc_id, applied.version)
        if self.index.needs_compaction() and not self.compacting:
            self.compacting = True
            self._compaction = asyncio.ensure_future(self._compact())

    async def _compact(self) -> None:
        start = time.perf_counter()
        try:
            await self.index.compact()
        finally:
            self.compacting = False
        log.info(
            "dense index compacted",
            extra={"chunks": len(self.index), "seconds": round(time.perf_counter() - start, 2)},
        )

    async def _activate(self, doc_id: str, version: str) -> None:
        prefix = f"{doc_id}#{version[:16]}#"
        chunks = [c for cid, c in self.pending.items() if cid.startswith(prefix)]
        expected = chunks[0].chunk.chunk_count if chunks else -1
        if len(chunks) != expected:
            chunks = await self.store.version_chunks(doc_id, version)  # arrived before a restart
        for c in chunks:
            self.pending.pop(c.chunk.chunk_id, None)
        self.index.add(chunks)
        self.bm25_dirty.set()
        if chunks and chunks[0].chunk.ingested_at_ms:
            lag_ms = now_ms() - chunks[0].chunk.ingested_at_ms
            INGEST_SEARCHABLE_LAG.observe(max(0.0, lag_ms / 1000))

    # -- a restarted Redis -------------------------------------------------------------------
    async def watch_redis(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                run_id = str((await self.store.client.info("server")).get("run_id", ""))
            except Exception:  # down or loading: the handler's own calls wait for it
                run_id = ""
            if run_id and self._redis_run_id and run_id != self._redis_run_id:
                log.warning("Redis restarted (run id changed): resynchronising the index")
                self._redis_restarted = True
            if run_id:
                self._redis_run_id = run_id
            await asyncio.sleep(interval_s)

    async def _resync(self) -> None:
        await self.load()
        offsets = await self.store.offsets()
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if tp.partition in offsets:
                self.consumer.seek(tp, offsets[tp.partition])
            else:
                await self.consumer.seek_to_beginning(tp)
        self._redis_restarted = False

    async def rebuild_bm25(self) -> None:
        while True:
            await self.bm25_dirty.wait()
            self.bm25_dirty.clear()
            start = time.perf_counter()
            await asyncio.to_thread(self.index.lexical.rebuild)
            took = time.perf_counter() - start
            # A rebuild is O(corpus): while a large corpus is loading, pause in proportion so
            # rebuilds take at most a third of a core away from indexing.
            await asyncio.sleep(max(self.settings.retrieve_bm25_rebuild_s, 2 * took))
