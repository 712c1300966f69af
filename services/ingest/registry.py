"""Document registry and outbox in Redis: every accepted version and every deletion, kept
until retrieve has applied it, so nothing acknowledged depends on the broker keeping its log.

Key layout (prefix ``p``):

* ``p:doc:<id>`` (hash): ``content_hash`` of the latest accepted version ("" for a deletion,
  a tombstone), ``chunk_count``, ``accepted_at_ms``, ``deleted_at_ms`` (tombstones), ``log``
  (``partition:offset:timestamp`` of the last record published for it), ``published_at_ms``
  and ``attempts`` (publications so far).
* ``p:ingest:outbox`` (sorted set): ids not yet applied by retrieve, scored by when the
  reconciler looks at them next (ms).
* ``p:ingest:body:<id>``: the accepted version as a ``RawDocument`` event (cleaned text and
  metadata), what the reconciler publishes again; deleted once the version is searchable.

:meth:`accept` writes all three in one MULTI before anything is published, so a version is in
Redis before its records are on the broker, and both before the client's ack. A version leaves
the outbox only when retrieve's active version is it (:meth:`settle`, a compare-and-delete, so a
newer version accepted meanwhile stays); a tombstone when retrieve holds nothing of the
document any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.common.indexed import Indexed, IndexedDocuments
from services.common.redisutil import text


@dataclass(frozen=True)
class LogPosition:
    partition: int
    offset: int
    timestamp_ms: int

    def encode(self) -> str:
        return f"{self.partition}:{self.offset}:{self.timestamp_ms}"

    @classmethod
    def decode(cls, raw: bytes | None) -> LogPosition | None:
        parts = text(raw).split(":") if raw else []
        if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
            return None
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))


@dataclass(frozen=True)
class Accepted:
    doc_id: str
    content_hash: str
    chunk_count: int
    accepted_at_ms: int
    body: bytes  # a serialized RawDocument


@dataclass(frozen=True)
class Known:
    accepted: str | None  # latest accepted version ("" = deleted, None = never seen)
    active: str | None  # the searchable version


@dataclass(frozen=True)
class Pending:
    doc_id: str
    content_hash: str  # "" for a deletion
    chunk_count: int
    accepted_at_ms: int
    body: bytes | None
    position: LogPosition | None
    published_at_ms: int
    attempts: int
    indexed: Indexed

    @property
    def deletion(self) -> bool:
        return self.content_hash == ""

    @property
    def settled(self) -> bool:
        """Retrieve has applied it: the version is searchable, or nothing of a deleted
        document is left."""
        if self.deletion:
            return self.indexed.active is None and not self.indexed.held
        return self.indexed.active == self.content_hash


# KEYS: doc hash, outbox, body. ARGV: id, expected content hash.
_SETTLE = """
local cur = redis.call('HGET', KEYS[1], 'content_hash') or ''
if cur ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: doc hash, outbox. ARGV: expected hash, log, published_at, attempts, due, id.
_PUBLISHED = """
local cur = redis.call('HGET', KEYS[1], 'content_hash') or ''
if cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'log', ARGV[2], 'published_at_ms', ARGV[3], 'attempts', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
return 1
"""

_FIELDS = [
    "content_hash",
    "chunk_count",
    "accepted_at_ms",
    "log",
    "published_at_ms",
    "attempts",
]


class RedisDocumentRegistry:
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix
        self.indexed = IndexedDocuments(client, prefix)
        self.outbox_key = f"{prefix}:ingest:outbox"
        self._settle = client.register_script(_SETTLE)
        self._published = client.register_script(_PUBLISHED)

    def _key(self, doc_id: str) -> str:
        return f"{self.prefix}:doc:{doc_id}"

    def _body_key(self, doc_id: str) -> str:
        return f"{self.prefix}:ingest:body:{doc_id}"

    async def known(self, ids: Sequence[str]) -> list[Known]:
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for doc_id in ids:
            pipe.hget(self._key(doc_id), "content_hash")
        accepted = await pipe.execute()
        indexed = await self.indexed.state(ids)
        return [
            Known(None if a is None else text(a), i.active)
            for a, i in zip(accepted, indexed, strict=True)
        ]

    async def accept(self, docs: Sequence[Accepted], due_ms: int) -> None:
        """Records versions before they are published (one MULTI for the batch)."""
        pipe = self.client.pipeline(transaction=True)
        for d in docs:
            key = self._key(d.doc_id)
            pipe.delete(key)  # a tombstone's or an older version's fields go
            pipe.hset(
                key,
                mapping={
                    "content_hash": d.content_hash,
                    "chunk_count": d.chunk_count,
                    "accepted_at_ms": d.accepted_at_ms,
                    "attempts": 0,
                },
            )
            pipe.set(self._body_key(d.doc_id), d.body)
            pipe.zadd(self.outbox_key, {d.doc_id: due_ms})
        await pipe.execute()

    async def tombstone(self, doc_id: str, at_ms: int, due_ms: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key(doc_id), self._body_key(doc_id))
        pipe.hset(
            self._key(doc_id),
            mapping={"content_hash": "", "deleted_at_ms": at_ms, "attempts": 0},
        )
        pipe.zadd(self.outbox_key, {doc_id: due_ms})
        await pipe.execute()

    async def published(
        self,
        doc_id: str,
        content_hash: str,
        position: LogPosition,
        at_ms: int,
        attempts: int,
        due_ms: int,
    ) -> bool:
        """Where the state's last record went; False if a newer state replaced it meanwhile."""
        args: list[str | int] = [content_hash, position.encode(), at_ms, attempts, due_ms, doc_id]
        return bool(await self._published(keys=[self._key(doc_id), self.outbox_key], args=args))

    async def settle(self, doc_id: str, content_hash: str) -> bool:
        keys = [self._key(doc_id), self.outbox_key, self._body_key(doc_id)]
        return bool(await self._settle(keys=keys, args=[doc_id, content_hash]))

    async def postpone(self, doc_id: str, due_ms: int) -> None:
        await self.client.zadd(self.outbox_key, {doc_id: due_ms}, xx=True)

    async def due(self, now_ms: int, limit: int) -> list[str]:
        ids = await self.client.zrangebyscore(self.outbox_key, "-inf", now_ms, start=0, num=limit)
        return [text(i) for i in ids]  # type: ignore[arg-type]

    async def outbox(self, limit: int) -> list[str]:
        ids = await self.client.zrange(self.outbox_key, 0, limit - 1)
        return [text(i) for i in ids]  # type: ignore[arg-type]

    async def outbox_size(self) -> int:
        return int(await self.client.zcard(self.outbox_key))

    async def pending(self, ids: Sequence[str]) -> list[Pending | None]:
        """The outbox state of each id (None: no longer recorded)."""
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for doc_id in ids:
            pipe.hmget(self._key(doc_id), _FIELDS)
            pipe.get(self._body_key(doc_id))
        replies = await pipe.execute()
        indexed = await self.indexed.state(ids)
        out: list[Pending | None] = []
        for doc_id, fields, body, idx in zip(
            ids, replies[::2], replies[1::2], indexed, strict=True
        ):
            h, chunks, at, where, published, attempts = fields
            if h is None:
                out.append(None)
                continue
            out.append(
                Pending(
                    doc_id,
                    text(h),
                    int(chunks or 0),
                    int(at or 0),
                    body,
                    LogPosition.decode(where),
                    int(published or 0),
                    int(attempts or 0),
                    idx,
                )
            )
        return out

    async def get(self, doc_id: str) -> tuple[str, int, int] | None:
        """(content hash, chunks, accepted at) of a document's latest accepted version; None
        for an unknown or deleted one."""
        h, chunks, at = await self.client.hmget(
            self._key(doc_id), ["content_hash", "chunk_count", "accepted_at_ms"]
        )
        if not h:
            return None
        return text(h), int(chunks or 0), int(at or 0)
