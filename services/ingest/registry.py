"""Document registry in Redis: the latest accepted version of every document."""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from services.common.keys import active_version_key
from services.common.redisutil import text


class RedisDocumentRegistry:
    def __init__(self, client: aioredis.Redis, prefix: str, inflight_s: float = 60.0):
        self.client = client
        self.prefix = prefix
        self.inflight_s = inflight_s

    def _key(self, doc_id: str) -> str:
        return f"{self.prefix}:doc:{doc_id}"

    async def get_hashes(self, ids: Sequence[str]) -> list[str | None]:
        """The version each document is known to have: the indexed (active) version, or one
        accepted so recently that it may still be on its way through the pipeline.

        An accepted version that never became active (the embedded broker keeps nothing across
        a restart) is not trusted past ``inflight_s``: re-ingesting it publishes it again, which
        downstream consumers absorb idempotently.
        """
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for doc_id in ids:
            pipe.hmget(self._key(doc_id), ["content_hash", "accepted_at_ms"])
            pipe.get(active_version_key(self.prefix, doc_id))
        replies = await pipe.execute()
        now = time.time() * 1000
        known: list[str | None] = []
        for (accepted, at_ms), active in zip(replies[::2], replies[1::2], strict=True):
            if accepted and (accepted == active or now - int(at_ms or 0) < self.inflight_s * 1000):
                known.append(accepted.decode())
            else:
                known.append(active.decode() if active else None)
        return known

    async def record(self, docs: Sequence[tuple[str, str, int, int]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for doc_id, content_hash, chunks, at_ms in docs:
            pipe.hset(
                self._key(doc_id),
                mapping={
                    "content_hash": content_hash,
                    "chunk_count": chunks,
                    "accepted_at_ms": at_ms,
                },
            )
        await pipe.execute()

    async def get(self, doc_id: str) -> tuple[str, int, int] | None:
        data = await self.client.hgetall(self._key(doc_id))
        if not data:
            return None
        return (
            text(data[b"content_hash"]),
            int(data[b"chunk_count"]),
            int(data[b"accepted_at_ms"]),
        )

    async def delete(self, doc_id: str) -> bool:
        return bool(await self.client.delete(self._key(doc_id)))
