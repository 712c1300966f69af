"""The backoff of a call that was shed (RESOURCE_EXHAUSTED: the model's admission limit), for the
clients that would rather wait for room than fail: the sync gRPC helper
(:func:`services.common.clients.patiently`) and the Triton client's patient generate."""

from __future__ import annotations

import time


class ShedBackoff:
    """Waits of ``first_s`` doubling up to ``cap_s``, all within ``timeout_s`` from now."""

    def __init__(self, timeout_s: float, first_s: float = 0.05, cap_s: float = 2.0):
        self.deadline = time.monotonic() + timeout_s
        self.delay = first_s
        self.cap_s = cap_s

    def left(self) -> float:
        """The time the next try may take."""
        return max(0.001, self.deadline - time.monotonic())

    def next_wait(self) -> float | None:
        """How long to wait before trying again; None when that would pass the deadline."""
        if time.monotonic() + self.delay >= self.deadline:
            return None
        wait, self.delay = self.delay, min(2 * self.delay, self.cap_s)
        return wait
