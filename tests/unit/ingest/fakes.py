"""In-memory stand-ins for the ingest registry (with retrieve's view of what is indexed) and
the broker, for the pipeline and reconciler tests."""

from __future__ import annotations

from services.common.indexed import Indexed
from services.common.logprobe import Probe
from services.ingest.registry import Accepted, Known, LogPosition, Pending


class FakeRegistry:
    def __init__(self):
        self.docs: dict[str, dict] = {}
        self.bodies: dict[str, bytes] = {}
        self.due_at: dict[str, int] = {}  # the outbox: id -> when due
        self.active: dict[str, str] = {}  # what retrieve has made searchable
        self.held: set[str] = set()

    async def known(self, ids):
        return [Known(self.docs.get(i, {}).get("content_hash"), self.active.get(i)) for i in ids]

    async def accept(self, docs: list[Accepted], due_ms):
        for d in docs:
            self.docs[d.doc_id] = {
                "content_hash": d.content_hash,
                "chunk_count": d.chunk_count,
                "accepted_at_ms": d.accepted_at_ms,
                "attempts": 0,
            }
            self.bodies[d.doc_id] = d.body
            self.due_at[d.doc_id] = due_ms

    async def tombstone(self, doc_id, at_ms, due_ms):
        self.docs[doc_id] = {"content_hash": "", "deleted_at_ms": at_ms, "attempts": 0}
        self.bodies.pop(doc_id, None)
        self.due_at[doc_id] = due_ms

    async def published(self, doc_id, content_hash, position, at_ms, attempts, due_ms):
        doc = self.docs.get(doc_id)
        if doc is None or doc["content_hash"] != content_hash:
            return False
        doc.update(log=position, published_at_ms=at_ms, attempts=attempts)
        self.due_at[doc_id] = due_ms
        return True

    async def pending(self, ids):
        out = []
        for i in ids:
            d = self.docs.get(i)
            if d is None:
                out.append(None)
                continue
            indexed = Indexed(self.active.get(i), i in self.held or i in self.active)
            out.append(
                Pending(
                    i,
                    d["content_hash"],
                    d.get("chunk_count", 0),
                    d.get("accepted_at_ms", 0),
                    self.bodies.get(i),
                    d.get("log"),
                    d.get("published_at_ms", 0),
                    d.get("attempts", 0),
                    indexed,
                )
            )
        return out

    async def settle(self, doc_id, content_hash):
        if self.docs.get(doc_id, {}).get("content_hash", "") != content_hash:
            return False
        self.due_at.pop(doc_id, None)
        self.bodies.pop(doc_id, None)
        if content_hash == "":
            self.docs.pop(doc_id, None)
        return True

    async def postpone(self, doc_id, due_ms):
        if doc_id in self.due_at:
            self.due_at[doc_id] = due_ms

    async def due(self, now_ms, limit):
        return sorted(i for i, at in self.due_at.items() if at <= now_ms)[:limit]

    async def outbox(self, limit):
        return sorted(self.due_at, key=self.due_at.__getitem__)[:limit]

    async def outbox_size(self):
        return len(self.due_at)

    async def get(self, doc_id):
        d = self.docs.get(doc_id)
        if not d or not d["content_hash"]:
            return None
        return d["content_hash"], d["chunk_count"], d["accepted_at_ms"]


class FakeLog:
    """The broker's chunk topic: what was published, and a restart that loses it."""

    def __init__(self):
        self.records: list[tuple[str, bytes, bytes]] = []
        self.offsets: dict[int, int] = {}
        self.positions: set[LogPosition] = set()
        self.calls = 0

    async def publish(self, records):
        self.calls += 1
        out = []
        for topic, key, value in records:
            partition = sum(key) % 4
            offset = self.offsets.get(partition, 0)
            self.offsets[partition] = offset + 1
            position = LogPosition(partition, offset, 1000 + len(self.records))
            self.records.append((topic, key, value))
            self.positions.add(position)
            out.append(position)
        return out

    def lose_everything(self):
        self.positions.clear()
        self.offsets.clear()

    async def check(self, tp, fp):
        position = LogPosition(tp.partition, fp.offset, fp.timestamp_ms)
        return Probe.INTACT if position in self.positions else Probe.GONE
