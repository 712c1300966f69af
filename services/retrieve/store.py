"""The authoritative chunk store in Redis, and the consumer's offsets beside it.

Each embedded-chunk record is applied by one Lua script that stores the chunk, activates the
document version once all its chunks are present (dropping every other version of the document)
and advances the partition's offset, all atomically. A crash at any point therefore leaves Redis
either before or after a record, never in between, and the consumer resumes at the stored
offset: nothing is lost and nothing is applied twice. The in-memory index is a view that is
rebuilt from here on start.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from knowstream.events.v1 import events_pb2
from services.common.redisutil import text

_ADVANCE = """
local function advance(okey, part, off)
  local cur = tonumber(redis.call('HGET', okey, part) or '-1')
  if off + 1 > cur then redis.call('HSET', okey, part, off + 1) end
end
"""

# Deletes one stored version of a document (its chunks and its member set) and appends the
# removed chunk ids to `result`.
_DROP_VERSION = """
local function drop_version(p, doc, v, result)
  local vkey = p .. ':ver:' .. doc .. ':' .. v
  for _, m in ipairs(redis.call('SMEMBERS', vkey)) do
    redis.call('DEL', p .. ':chunk:' .. m)
    table.insert(result, m)
  end
  redis.call('DEL', vkey)
  redis.call('SREM', p .. ':vers:' .. doc, v)
end
"""

_APPLY_CHUNK = (
    _ADVANCE
    + _DROP_VERSION
    + """
local p, doc, h, cid, count, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local okey, part, off = ARGV[7], ARGV[8], tonumber(ARGV[9])
if redis.call('GET', p .. ':active:' .. doc) == h then
  advance(okey, part, off)
  return {'noop'}
end
local vkey = p .. ':ver:' .. doc .. ':' .. h
redis.call('SET', p .. ':chunk:' .. cid, data)
redis.call('SADD', vkey, cid)
redis.call('SADD', p .. ':vers:' .. doc, h)
if redis.call('SCARD', vkey) < count then
  advance(okey, part, off)
  return {'pending'}
end
local result = {'activated'}
for _, v in ipairs(redis.call('SMEMBERS', p .. ':vers:' .. doc)) do
  if v ~= h then drop_version(p, doc, v, result) end
end
redis.call('SET', p .. ':active:' .. doc, h)
redis.call('SADD', p .. ':docs', doc)
advance(okey, part, off)
return result
"""
)

_APPLY_DELETE = (
    _ADVANCE
    + _DROP_VERSION
    + """
local p, doc = ARGV[1], ARGV[2]
local okey, part, off = ARGV[3], ARGV[4], tonumber(ARGV[5])
local result = {'deleted'}
for _, v in ipairs(redis.call('SMEMBERS', p .. ':vers:' .. doc)) do
  drop_version(p, doc, v, result)
end
redis.call('DEL', p .. ':vers:' .. doc, p .. ':active:' .. doc)
redis.call('SREM', p .. ':docs', doc)
advance(okey, part, off)
return result
"""
)


@dataclass(frozen=True)
class Applied:
    """What a record changed: ``activated`` names the version whose chunks became searchable
    and ``removed`` the chunk ids that are gone."""

    kind: str  # noop | pending | activated | deleted
    doc_id: str = ""
    version: str = ""
    removed: tuple[str, ...] = ()


class ChunkStore:
    def __init__(self, client: aioredis.Redis, prefix: str, topic: str):
        self.client = client
        self.prefix = prefix
        self.offsets_key = f"{prefix}:retrieve:offsets:{topic}"
        self._apply_chunk = client.register_script(_APPLY_CHUNK)
        self._apply_delete = client.register_script(_APPLY_DELETE)

    async def apply(
        self, records: Iterable[tuple[int, int, events_pb2.KnowledgeEvent]]
    ) -> list[Applied]:
        """Applies (partition, offset, event) records in order, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        meta: list[tuple[str, str]] = []
        for partition, offset, event in records:
            kind = event.WhichOneof("kind")
            if kind == "embedded":
                c = event.embedded.chunk
                await self._apply_chunk(
                    args=[
                        self.prefix,
                        c.doc_id,
                        c.content_hash,
                        c.chunk_id,
                        c.chunk_count,
                        event.embedded.SerializeToString(),
                        self.offsets_key,
                        partition,
                        offset,
                    ],
                    client=pipe,
                )
                meta.append((c.doc_id, c.content_hash))
            elif kind == "deleted":
                await self._apply_delete(
                    args=[
                        self.prefix,
                        event.deleted.doc_id,
                        self.offsets_key,
                        partition,
                        offset,
                    ],
                    client=pipe,
                )
                meta.append((event.deleted.doc_id, ""))
            else:
                raise ValueError(f"cannot apply a {kind} event")
        results = await pipe.execute()
        applied = []
        for (doc_id, version), result in zip(meta, results, strict=True):
            kind = result[0].decode()
            removed = tuple(r.decode() for r in result[1:])
            applied.append(Applied(kind, doc_id, version if kind == "activated" else "", removed))
        return applied

    async def advance(self, partition: int, offset: int) -> None:
        """Moves past a record that was dead-lettered."""
        await self.client.eval(
            _ADVANCE + "advance(KEYS[1], ARGV[1], tonumber(ARGV[2]))",
            1,
            self.offsets_key,
            partition,
            offset,
        )

    async def reset_offset(self, partition: int) -> None:
        await self.client.hdel(self.offsets_key, str(partition))

    async def offsets(self) -> dict[int, int]:
        """Next offset to consume per partition."""
        raw = await self.client.hgetall(self.offsets_key)
        return {int(k): int(v) for k, v in raw.items()}

    async def version_chunks(self, doc_id: str, version: str) -> list[events_pb2.EmbeddedChunk]:
        ids = await self.client.smembers(f"{self.prefix}:ver:{doc_id}:{version}")
        return await self.get_chunks([text(i) for i in ids])

    async def get_chunks(self, chunk_ids: list[str]) -> list[events_pb2.EmbeddedChunk]:
        if not chunk_ids:
            return []
        values = await self.client.mget([f"{self.prefix}:chunk:{c}" for c in chunk_ids])
        out = []
        for value in values:
            if value is not None:
                chunk = events_pb2.EmbeddedChunk()
                chunk.ParseFromString(value)
                out.append(chunk)
        return out

    async def load_active(self, batch: int = 500) -> list[events_pb2.EmbeddedChunk]:
        """Every chunk of every active document version (start-up rebuild)."""
        docs = [text(d) for d in await self.client.smembers(f"{self.prefix}:docs")]
        chunks: list[events_pb2.EmbeddedChunk] = []
        for start in range(0, len(docs), batch):
            part = docs[start : start + batch]
            versions = await self.client.mget([f"{self.prefix}:active:{d}" for d in part])
            pipe = self.client.pipeline(transaction=False)
            for doc_id, version in zip(part, versions, strict=True):
                pipe.smembers(f"{self.prefix}:ver:{doc_id}:{text(version or b'')}")
            members = await pipe.execute()
            ids = [m.decode() for group in members for m in group]
            chunks.extend(await self.get_chunks(ids))
        return chunks
