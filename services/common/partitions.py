"""Per-partition bookkeeping of a consumer, without I/O: where it is, what it last processed
(the fingerprint that log-reset checks compare), its lag, and whether it is stalled.

"Stalled" is the health rule of the consumer plumbing: records wait in a partition (lag > 0) and
none has been processed for ``stall_s``. A partition that is merely busy keeps processing, so
its lag may grow without it being stalled; one whose handler keeps failing on a dependency that
is down, or hangs, is stalled, and its service says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from services.common.logprobe import Fingerprint


@dataclass
class PartitionState:
    next_offset: int = 0  # the next offset to process (what is committed)
    fingerprint: Fingerprint | None = None  # the last record processed
    lag: int = 0
    waiting_since: float | None = None  # when records started to wait
    progress_at: float = 0.0  # when a record was last processed
    stalled: bool = False


@dataclass
class StreamStatus:
    ok: bool
    reason: str = ""
    lag: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "reason": self.reason, "lag": self.lag}


def label(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


class PartitionTracker:
    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic):
        self.stall_s = stall_s
        self.clock = clock
        self.parts: dict[TopicPartition, PartitionState] = {}
        # Fingerprints outlive an assignment: a partition that comes back is checked against
        # what this process last saw of it.
        self.fingerprints: dict[TopicPartition, Fingerprint] = {}
        self.resets: dict[TopicPartition, int] = {}  # how many times each was found reset
        self.last_error = ""

    def assigned(self, tp: TopicPartition, next_offset: int) -> PartitionState:
        state = PartitionState(next_offset, self.fingerprints.get(tp), progress_at=self.clock())
        self.parts[tp] = state
        return state

    def revoked(self, tp: TopicPartition) -> None:
        self.parts.pop(tp, None)

    def processed(self, tp: TopicPartition, offset: int, timestamp_ms: int) -> None:
        state = self.parts.get(tp)
        if state is None:
            return  # not ours (any more): what we last saw of it stays the reference
        fp = Fingerprint(offset, timestamp_ms)
        self.fingerprints[tp] = fp
        state.next_offset = offset + 1  # in order; after a seek back it goes back too
        state.fingerprint = fp
        state.progress_at = self.clock()
        self.last_error = ""

    def reset(self, tp: TopicPartition) -> None:
        """The log was reset: start again at 0, with nothing known of the new log."""
        self.fingerprints.pop(tp, None)
        self.resets[tp] = self.resets.get(tp, 0) + 1
        state = self.parts.get(tp)
        if state is not None:
            state.next_offset, state.fingerprint, state.lag = 0, None, 0
            state.progress_at, state.waiting_since, state.stalled = self.clock(), None, False

    def observe_end(self, tp: TopicPartition, end: int) -> PartitionState | None:
        """Records the partition's end offset (a lower bound on the embedded broker) and updates
        lag and the stall state."""
        state = self.parts.get(tp)
        if state is None:
            return None
        now = self.clock()
        state.lag = max(0, end - state.next_offset)
        if state.lag == 0:
            state.waiting_since, state.stalled = None, False
            return state
        if state.waiting_since is None:
            state.waiting_since = now
        idle_since = max(state.waiting_since, state.progress_at)
        state.stalled = now - idle_since > self.stall_s
        return state

    def status(self) -> StreamStatus:
        now = self.clock()
        stalled = [(tp, s) for tp, s in self.parts.items() if s.stalled]
        lag = {label(tp): s.lag for tp, s in sorted(self.parts.items())}
        if not stalled:
            return StreamStatus(True, "", lag)
        parts = "; ".join(
            f"{label(tp)}: {s.lag}+ records waiting, none processed for "
            f"{now - max(s.waiting_since or 0.0, s.progress_at):.0f} s"
            for tp, s in sorted(stalled)
        )
        reason = f"stalled: {parts}"
        if self.last_error:
            reason += f" (last error: {self.last_error})"
        return StreamStatus(False, reason, lag)
