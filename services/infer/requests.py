"""The questions of answered requests, kept for a while so that feedback on a request (which
names only its id) can carry the question to the trainer.

Key family, owned here: ``<prefix>:request:<request id>`` -> the question (expires after
``infer_request_ttl_s``).
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from services.common.redisutil import text

log = logging.getLogger(__name__)


class RecentRequests:
    def __init__(self, client: aioredis.Redis, prefix: str, ttl_s: int):
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, request_id: str) -> str:
        return f"{self.prefix}:request:{request_id}"

    async def remember(self, request_id: str, question: str) -> None:
        """Never fails: an answer is not refused because its question could not be kept."""
        try:
            await self.client.set(self._key(request_id), question, ex=self.ttl_s)
        except Exception as exc:
            log.warning("could not record request %s: %s", request_id, exc)

    async def question_of(self, request_id: str) -> str:
        """The question of ``request_id``; "" when unknown or expired."""
        raw = await self.client.get(self._key(request_id))
        return text(raw) if raw else ""
