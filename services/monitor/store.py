"""The monitor's state in Redis: the authoritative copy (the embedded broker keeps nothing across
a restart, and faust tables could miss updates), written so that a restart resumes exactly.

Keys under ``<prefix>:monitor:``

- ``log``: a stream of accepted questions (question, embedding, best retrieval score,
  confidence, arrival time). Stream ids are arrival times, so time-range references come for
  free. Capped at ``monitor_log_max`` entries.
- ``seen:<id>``: de-duplication marks of consumed events (at-least-once delivery), with a TTL.
- ``state``: hash {cursor (last log id consumed by a window), next_window, policy (JSON),
  questions, dead_letters}.
- ``reference``: hash of the reference's arrays and info.
- ``signals`` / ``signals:snap``: answer-side counters (shadow pairs, feedback) accumulating
  for the next window, and their snapshot taken by the window being computed.
- ``windows``: the latest DriftWindow records; ``events``: DriftEvent records, newest first.
- ``gaps``: knowledge gaps and how far newly ingested chunks cover their questions.
- ``outbox``: Kafka records committed with a window but not yet acknowledged by the broker;
  published again after a restart (consumers de-duplicate by key).

A window's results, the cursor, the policy state and the outbox are written in one MULTI/EXEC,
so a crash leaves either the window fully recorded or not at all (then it is recomputed from the
same log entries, with the same seed, to the same result).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from services.common.redisutil import text
from services.monitor.drift import Reference

_ACCEPT = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return false end
local args = {KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
local id = redis.call('XADD', unpack(args))
redis.call('HINCRBY', KEYS[3], 'questions', 1)
return id
"""

_SIGNAL = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""

# The snapshot survives a crash between taking it and committing the window: the retry reads
# the same counters instead of losing them.
_SNAPSHOT = """
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
end
return redis.call('HGETALL', KEYS[2])
"""


@dataclass
class LogEntry:
    entry_id: str
    request_id: str
    question: str
    embedding: np.ndarray
    top_score: float | None
    confidence: float | None
    at_ms: int

    @property
    def arrived_ms(self) -> int:
        """When the monitor accepted it: the log's stream id is the arrival time."""
        return int(self.entry_id.split("-")[0])

    def fields(self) -> list[Any]:
        return [
            "r",
            self.request_id,
            "q",
            self.question,
            "e",
            np.asarray(self.embedding, dtype=np.float32).tobytes(),
            "s",
            "" if self.top_score is None else repr(float(self.top_score)),
            "c",
            "" if self.confidence is None else repr(float(self.confidence)),
            "t",
            str(self.at_ms),
        ]

    @classmethod
    def from_stream(cls, entry_id: Any, raw: dict[Any, Any]) -> LogEntry:
        d = {text(k): v for k, v in raw.items()}
        score, confidence = text(d.get("s", b"")), text(d.get("c", b""))
        return cls(
            entry_id=text(entry_id),
            request_id=text(d.get("r", b"")),
            question=text(d["q"]),
            embedding=np.frombuffer(d["e"], dtype=np.float32),
            top_score=float(score) if score else None,
            confidence=float(confidence) if confidence else None,
            at_ms=int(text(d.get("t", b"0"))),
        )


@dataclass
class MonitorState:
    cursor: str
    next_window: int
    policy: dict[str, Any]
    questions: int
    dead_letters: int


@dataclass
class OutboxRecord:
    topic: str
    key: str
    value: bytes


class MonitorStore:
    def __init__(self, client: aioredis.Redis, prefix: str, dedup_ttl_s: int, log_max: int):
        self.redis = client
        self.dedup_ttl_s = dedup_ttl_s
        self.log_max = log_max
        base = f"{prefix}:monitor"
        self.log_key = f"{base}:log"
        self.state_key = f"{base}:state"
        self.reference_key = f"{base}:reference"
        self.signals_key = f"{base}:signals"
        self.snapshot_key = f"{base}:signals:snap"
        self.windows_key = f"{base}:windows"
        self.events_key = f"{base}:events"
        self.outbox_key = f"{base}:outbox"
        self.gaps_key = f"{base}:gaps"
        self._seen = f"{base}:seen"
        self._accept = client.register_script(_ACCEPT)
        self._signal = client.register_script(_SIGNAL)
        self._snapshot = client.register_script(_SNAPSHOT)

    # -- input ------------------------------------------------------------------------------
    async def accept(self, dedup_id: str, entry: LogEntry) -> str | None:
        """Appends a question to the log unless this event was seen; returns its log id."""
        reply = await self._accept(
            keys=[f"{self._seen}:{dedup_id}", self.log_key, self.state_key],
            args=[self.dedup_ttl_s, self.log_max, *entry.fields()],
        )
        return text(reply) if reply else None

    async def add_signals(self, dedup_id: str, counters: dict[str, float]) -> bool:
        args: list[Any] = [self.dedup_ttl_s]
        for name, value in counters.items():
            args += [name, repr(float(value))]
        return bool(
            await self._signal(keys=[f"{self._seen}:{dedup_id}", self.signals_key], args=args)
        )

    async def count_dead_letter(self) -> None:
        await self.redis.hincrby(self.state_key, "dead_letters", 1)  # type: ignore[misc]

    # -- reading ----------------------------------------------------------------------------
    async def state(self) -> MonitorState:
        raw: dict[Any, Any] = await self.redis.hgetall(self.state_key)  # type: ignore[misc]
        d = {text(k): text(v) for k, v in raw.items()}
        return MonitorState(
            cursor=d.get("cursor", "0-0"),
            next_window=int(d.get("next_window", 0)),
            policy=json.loads(d["policy"]) if d.get("policy") else {},
            questions=int(d.get("questions", 0)),
            dead_letters=int(d.get("dead_letters", 0)),
        )

    async def entries_after(self, cursor: str, count: int) -> list[LogEntry]:
        start = "-" if cursor == "0-0" else f"({cursor}"
        rows: Any = await self.redis.xrange(self.log_key, start, "+", count=count)
        return [LogEntry.from_stream(i, f) for i, f in rows]

    async def pending(self, cursor: str, limit: int) -> int:
        start = "-" if cursor == "0-0" else f"({cursor}"
        rows: Any = await self.redis.xrange(self.log_key, start, "+", count=limit)
        return len(rows)

    async def entries_between(self, from_ms: int, to_ms: int, limit: int) -> list[LogEntry]:
        rows: Any = await self.redis.xrange(
            self.log_key, str(max(0, from_ms)), str(to_ms) if to_ms else "+", count=limit
        )
        return [LogEntry.from_stream(i, f) for i, f in rows]

    async def latest_entries(self, count: int) -> list[LogEntry]:
        rows: Any = await self.redis.xrevrange(self.log_key, "+", "-", count=count)
        return [LogEntry.from_stream(i, f) for i, f in reversed(rows)]

    async def snapshot_signals(self) -> dict[str, float]:
        raw = await self._snapshot(keys=[self.signals_key, self.snapshot_key])
        return {text(raw[i]): float(text(raw[i + 1])) for i in range(0, len(raw), 2)}

    async def windows(self, count: int) -> list[bytes]:
        rows: Any = await self.redis.lrange(self.windows_key, -count, -1)  # type: ignore[misc]
        return list(rows)

    async def events(self, count: int) -> list[bytes]:
        rows: Any = await self.redis.lrange(self.events_key, 0, count - 1)  # type: ignore[misc]
        return list(rows)

    # -- reference --------------------------------------------------------------------------
    async def save_reference(
        self, info: dict[str, Any], reference: Reference, cursor: str | None, policy: dict[str, Any]
    ) -> None:
        """Replaces the reference and resets the policy state in one transaction; ``cursor``
        (when given) moves the windows past the questions the reference was built from."""
        a = reference.to_arrays()
        mapping: dict[str, Any] = {
            "info": json.dumps(info),
            "embeddings": np.asarray(a["embeddings"], np.float32).tobytes(),
            "dimension": str(a["embeddings"].shape[1]),
            "texts": json.dumps(a["texts"]),
            "sigma2": repr(a["sigma2"]),
            "centroids": np.asarray(a["centroids"], np.float32).tobytes(),
            "topic_hist": np.asarray(a["topic_hist"], np.float64).tobytes(),
            "vocabulary": json.dumps(a["vocabulary"]),
            "term_hist": np.asarray(a["term_hist"], np.float64).tobytes(),
            "alpha": repr(a["alpha"]),
        }
        state: dict[str, Any] = {"policy": json.dumps(policy)}
        if cursor is not None:
            state["cursor"] = cursor
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.reference_key)
            pipe.hset(self.reference_key, mapping=mapping)  # type: ignore[arg-type]
            pipe.hset(self.state_key, mapping=state)  # type: ignore[arg-type]
            await pipe.execute()

    async def load_reference(self) -> tuple[dict[str, Any], Reference] | None:
        raw: dict[Any, Any] = await self.redis.hgetall(self.reference_key)  # type: ignore[misc]
        if not raw:
            return None
        d = {text(k): v for k, v in raw.items()}
        dim = int(text(d["dimension"]))
        reference = Reference.from_arrays(
            {
                "embeddings": np.frombuffer(d["embeddings"], np.float32).reshape(-1, dim).copy(),
                "texts": json.loads(d["texts"]),
                "sigma2": float(text(d["sigma2"])),
                "centroids": np.frombuffer(d["centroids"], np.float32).reshape(-1, dim).copy(),
                "topic_hist": np.frombuffer(d["topic_hist"], np.float64).copy(),
                "vocabulary": json.loads(d["vocabulary"]),
                "term_hist": np.frombuffer(d["term_hist"], np.float64).copy(),
                "alpha": float(text(d["alpha"])),
            }
        )
        return json.loads(d["info"]), reference

    # -- output -----------------------------------------------------------------------------
    async def commit_window(
        self,
        *,
        cursor: str,
        next_window: int,
        policy: dict[str, Any],
        window: bytes,
        event: bytes | None,
        outbox: list[OutboxRecord],
        history: int,
        gap: dict[str, Any] | None = None,
    ) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.state_key,
                mapping={
                    "cursor": cursor,
                    "next_window": str(next_window),
                    "policy": json.dumps(policy),
                },
            )
            pipe.rpush(self.windows_key, window)
            pipe.ltrim(self.windows_key, -history, -1)
            if event is not None:
                pipe.lpush(self.events_key, event)
                pipe.ltrim(self.events_key, 0, history - 1)
            for record in outbox:
                pipe.hset(self.outbox_key, f"{record.topic}\n{record.key}", record.value)
            if gap is not None:
                pipe.hset(self.gaps_key, gap["key"], json.dumps(gap))
            pipe.delete(self.snapshot_key)
            await pipe.execute()

    async def gaps(self) -> list[dict[str, Any]]:
        """Knowledge gaps, newest first; each {key, created_ms, questions, embeddings (base64
        float32), best (best chunk score per question), closed_ms}."""
        raw: dict[Any, Any] = await self.redis.hgetall(self.gaps_key)  # type: ignore[misc]
        gaps = [json.loads(v) for v in raw.values()]
        return sorted(gaps, key=lambda g: -int(g["created_ms"]))

    async def save_gaps(
        self, gaps: list[dict[str, Any]], outbox: list[OutboxRecord] | None = None
    ) -> None:
        """Stores changed gaps and, in the same transaction, the events their change raises
        (a closed gap's retrain request), so neither is lost without the other."""
        if not gaps and not outbox:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            if gaps:
                pipe.hset(self.gaps_key, mapping={g["key"]: json.dumps(g) for g in gaps})
            for record in outbox or []:
                pipe.hset(self.outbox_key, f"{record.topic}\n{record.key}", record.value)
            await pipe.execute()

    async def outbox(self) -> list[OutboxRecord]:
        raw: dict[Any, Any] = await self.redis.hgetall(self.outbox_key)  # type: ignore[misc]
        records = []
        for field, value in raw.items():
            topic, _, key = text(field).partition("\n")
            records.append(OutboxRecord(topic, key, bytes(value)))
        return records

    async def sent(self, record: OutboxRecord) -> None:
        await self.redis.hdel(self.outbox_key, f"{record.topic}\n{record.key}")  # type: ignore[misc]
