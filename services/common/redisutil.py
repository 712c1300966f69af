"""Redis connections (authoritative state lives here, not in Kafka or faust tables)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# redis-py's default retry does not cover a pooled connection that a restarted Redis closed:
# the first command on each stale connection failed ("Connection closed by server"), and a
# service kept answering INTERNAL after a Redis restart. Retrying on a fresh connection for up
# to ~6 s rides out a restart; a Redis that stays down still fails the call.
_RETRY_ATTEMPTS = 6
_RETRY_ON = [RedisConnectionError, RedisTimeoutError, OSError]


def connect(url: str) -> aioredis.Redis:
    return aioredis.from_url(
        url,
        decode_responses=False,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2, base=0.05), _RETRY_ATTEMPTS),
        retry_on_error=list(_RETRY_ON),
    )


async def ping(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


def text(value: bytes | str) -> str:
    """Clients here are opened with decode_responses=False; this keeps the typing honest."""
    return value.decode() if isinstance(value, bytes) else value
