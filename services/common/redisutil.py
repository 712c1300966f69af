"""Redis connections (authoritative state lives here, not in Kafka or faust tables)."""

from __future__ import annotations

import redis.asyncio as aioredis


def connect(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, decode_responses=False, health_check_interval=10)


async def ping(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


def text(value: bytes | str) -> str:
    """Clients here are opened with decode_responses=False; this keeps the typing honest."""
    return value.decode() if isinstance(value, bytes) else value
