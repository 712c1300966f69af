"""What retrieve has made searchable, as another service may read it.

Retrieve's chunk store (services/retrieve/store.py) is the only writer of these keys; ingest
reads them through :class:`IndexedDocuments` to tell an accepted version that is indexed from
one still on its way (or lost with a broker's log), and an applied deletion from a pending one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.common.keys import active_version_key, stored_versions_key
from services.common.redisutil import text


@dataclass(frozen=True)
class Indexed:
    active: str | None  # content hash of the searchable version
    held: bool  # the store holds chunks of some version (searchable or not yet complete)


class IndexedDocuments:
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix

    async def state(self, ids: Sequence[str]) -> list[Indexed]:
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for doc_id in ids:
            pipe.get(active_version_key(self.prefix, doc_id))
            pipe.exists(stored_versions_key(self.prefix, doc_id))
        replies = await pipe.execute()
        return [
            Indexed(text(active) if active else None, bool(held))
            for active, held in zip(replies[::2], replies[1::2], strict=True)
        ]
