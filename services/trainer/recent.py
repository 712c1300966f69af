"""Recently ingested documents, read back from the chunk topic (ks.chunks) by time: the
continued-pretraining text of "what the domain has been writing lately", with the Kafka offsets
it came from (a dataset's provenance).

The topic is read directly (partitions assigned, no consumer group), from the first offset at or
after ``since_ms`` until a poll finds nothing more past the end offsets seen when the read
started (the embedded broker's end offsets can fall short of what it holds, so they are a
lower bound, not where reading stops).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from services.common.kafka import BadEvent, parse_knowledge_event


@dataclass
class RecentChunk:
    chunk_id: str
    doc_id: str
    content_hash: str  # the document version
    title: str
    text: str
    timestamp_ms: int
    offset: str  # "<topic>:<partition>:<offset>"
    chunk_index: int = 0
    # The document's tags (for PubMedQA its MeSH terms): the domain terms knowledge probes ask.
    tags: tuple[str, ...] = ()


@dataclass
class RecentRead:
    chunks: list[RecentChunk] = field(default_factory=list)
    # Records that are not valid chunk-topic events (counted, skipped).
    unreadable: int = 0
    # Chunks of documents with access groups: left out (counted).
    restricted: int = 0
    # Documents deleted (and not re-ingested) since: their chunks are left out.
    deleted: set[str] = field(default_factory=set)


def read_recent_chunks(
    bootstrap: str,
    topic: str,
    since_ms: int,
    timeout_s: float = 30.0,
    max_per_partition: int = 20_000,
) -> RecentRead:
    """The chunks published on ``topic`` since ``since_ms`` of documents still there, each in
    its newest version (records of one document share a partition: its id is the key). At most
    the last ``max_per_partition`` records of each partition are read: a job wants the newest
    few, and a busy topic holds a week of them."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
    )
    collector = _Collector(since_ms)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not parts:
            return collector.out
        starts = consumer.offsets_for_times({tp: since_ms for tp in parts})
        ends = consumer.end_offsets(parts)
        # A partition with nothing at or after since_ms: Kafka answers None, the embedded
        # broker a negative timestamp.
        todo = {
            tp: max(found.offset, ends[tp] - max_per_partition)
            for tp, found in starts.items()
            if found is not None and found.timestamp >= 0
        }
        if not todo:
            return collector.out
        consumer.assign(list(todo))
        for tp, start in todo.items():
            consumer.seek(tp, start)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500)
            for tp, records in polled.items():
                for record in records:
                    collector.add(tp, record)
            if not polled and all(consumer.position(tp) >= ends[tp] for tp in todo):
                break
        return collector.result()
    finally:
        consumer.close()


class _Collector:
    """Keeps the chunks read, the deletions, and each document's last version."""

    def __init__(self, since_ms: int):
        self.since_ms = since_ms
        self.out = RecentRead()
        self.by_id: dict[str, RecentChunk] = {}
        # Doc id -> content hash of its last record: a document's records share a partition
        # (its id is the key), so the last one read is its current version.
        self.versions: dict[str, str] = {}

    def add(self, tp: TopicPartition, record: Any) -> None:
        if record.timestamp < self.since_ms:
            return
        try:
            event = parse_knowledge_event(record.value)
        except BadEvent:
            self.out.unreadable += 1
            return
        kind = event.WhichOneof("kind")
        if kind == "deleted":
            self.out.deleted.add(event.deleted.doc_id)
            self.versions.pop(event.deleted.doc_id, None)
            return
        chunk = event.chunk
        if kind != "chunk" or not chunk.text.strip():
            return  # nothing to train on
        if chunk.metadata.access_groups:
            # An adapter answers anyone closed-book: documents only some callers may read must
            # never become its training text.
            self.out.restricted += 1
            return
        self.out.deleted.discard(chunk.doc_id)
        self.versions[chunk.doc_id] = chunk.content_hash
        self.by_id[chunk.chunk_id] = RecentChunk(
            chunk.chunk_id,
            chunk.doc_id,
            chunk.content_hash,
            chunk.title,
            chunk.text,
            record.timestamp,
            f"{tp.topic}:{tp.partition}:{record.offset}",
            chunk.chunk_index,
            tuple(chunk.metadata.tags),
        )

    def result(self) -> RecentRead:
        self.out.chunks = [
            c for c in self.by_id.values() if self.versions.get(c.doc_id) == c.content_hash
        ]
        return self.out
