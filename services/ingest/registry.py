"""Document registry in Redis: the latest accepted version of every document."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis


class RedisDocumentRegistry:
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix

    def _key(self, doc_id: str) -> str:
        return f"{self.prefix}:doc:{doc_id}"

    async def get_hashes(self, ids: Sequence[str]) -> list[str | None]:
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for doc_id in ids:
            pipe.hget(self._key(doc_id), "content_hash")
        return [v.decode() if v else None for v in await pipe.execute()]

    async def record(self, docs: Sequence[tuple[str, str, int, int]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for doc_id, content_hash, chunks, at_ms in docs:
            pipe.hset(self._key(doc_id), mapping={
                "content_hash": content_hash, "chunk_count": chunks, "accepted_at_ms": at_ms})
        await pipe.execute()

    async def get(self, doc_id: str) -> tuple[str, int, int] | None:
        data = await self.client.hgetall(self._key(doc_id))
        if not data:
            return None
        return (data[b"content_hash"].decode(), int(data[b"chunk_count"]),
                int(data[b"accepted_at_ms"]))

    async def delete(self, doc_id: str) -> bool:
        return bool(await self.client.delete(self._key(doc_id)))
