"""A child process's stdout, line by line, with a limit on the silence between lines.

A training process reports progress as lines on stdout; one that stops reporting (a wait on a
build lock, a deadlock in a collective, a hung read) would otherwise keep its job "training"
for ever and the trainer from taking the next job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

KILL_GRACE_S = 5.0


class NoProgress(TimeoutError):
    """The process wrote no line for ``timeout_s`` seconds and was killed."""

    def __init__(self, what: str, timeout_s: float, lines: int, setting: str = ""):
        self.timeout_s = timeout_s
        self.lines = lines
        limit = f"{timeout_s:g}s" + (f" ({setting})" if setting else "")
        after = f"after {lines} lines" if lines else "before its first line"
        super().__init__(f"{what} reported no progress for {limit}, {after}, and was killed")


async def lines_within(
    process: asyncio.subprocess.Process,
    timeout_s: float,
    what: str = "the process",
    setting: str = "",
) -> AsyncIterator[bytes]:
    """Yields ``process``'s stdout lines until end of file. When ``timeout_s`` passes without a
    line, the process is killed (and reaped) and :class:`NoProgress` is raised; ``setting``
    names where the limit comes from, for the message."""
    stream = process.stdout
    if stream is None:
        raise ValueError("the process was started without stdout=PIPE")
    count = 0
    while True:
        try:
            line = await asyncio.wait_for(stream.readline(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            # wait() also waits for the pipes to close, which a grandchild that inherited
            # stdout can hold open long after the process itself is gone: then our end of the
            # pipe is closed (asyncio has no public call for it; the transport is the one).
            try:
                await asyncio.wait_for(process.wait(), KILL_GRACE_S)
            except TimeoutError:
                transport = getattr(process, "_transport", None)
                if transport is not None:
                    transport.close()
            raise NoProgress(what, timeout_s, count, setting) from None
        if not line:
            return
        count += 1
        yield line
