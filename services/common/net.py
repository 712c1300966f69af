"""Tiny network probes used by readiness checks."""

from __future__ import annotations

import asyncio


async def tcp_alive(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def kafka_alive(bootstrap: str) -> bool:
    """True when at least one bootstrap broker accepts connections."""
    for address in bootstrap.split(","):
        if await tcp_alive(address.strip()):
            return True
    return False
