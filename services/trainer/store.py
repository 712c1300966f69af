"""The trainer's state in Redis: jobs, the triggers already turned into jobs, feedback
corrections waiting to be trained on, the rollout policy and its shadow tallies.

- ``<p>:trainer:job:<id>``: the Job (protobuf bytes); ``<p>:trainer:jobs``: ids by creation
- ``<p>:trainer:trigger:<key>``: job id of a RetrainRequested idempotency key (at-least-once
  delivery: the same event twice makes one job)
- ``<p>:trainer:corrections``: stream of corrections (question, correction, Kafka offset);
  ``<p>:trainer:correction:<request id>`` marks one already recorded
- ``<p>:trainer:policy``: hash {mode, watching, job}
- ``<p>:trainer:gate:<eval set>:<adapter>``: accuracy of the base model or a registered adapter
  on an eval set (recalled by later gates on the same split)
- ``<p>:trainer:probe:<adapter>``: hash {probe key: JSON log-probabilities of its candidates}
  (adapters are content-addressed and never change, so a probe is scored once per adapter)
- ``<p>:trainer:shadow:<adapter>``: hash {pairs, agreement_sum, errors};
  ``<p>:trainer:shadow:<adapter>:seen``: request ids counted (a redelivered pair counts once)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from knowstream.trainer.v1 import trainer_pb2
from services.common.redisutil import text

ENDED = ("registered", "rejected", "failed", "cancelled")


def unfinished(job: trainer_pb2.Job) -> bool:
    """Work is left: the job has not ended, or its adapter is registered but was never handed
    to the rollout (the trainer stopped between the two)."""
    return job.state not in ENDED or (job.state == "registered" and not job.rollout)


# Counts a request once in a tally: KEYS = (seen-set, tally hash); ARGV = (request id, then
# field/increment pairs). Shadow pairs and feedback votes are both tallied this way.
_COUNT_ONCE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"""
# Differing shadow pairs and feedback are kept this long for each other (either comes first).
PENDING_TTL_S = 7 * 86400


@dataclass
class ShadowTally:
    pairs: int = 0
    agreement_sum: float = 0.0
    errors: int = 0
    # Feedback votes on pairs whose answers differed (services/trainer/rollout.py).
    feedback_shadow: int = 0
    feedback_live: int = 0

    @property
    def agreement(self) -> float:
        answered = self.pairs - self.errors
        return self.agreement_sum / answered if answered > 0 else 0.0


@dataclass
class Correction:
    request_id: str
    question: str
    correction: str
    offset: str  # "<topic>:<partition>:<offset>"


class TrainerStore:
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.redis = client
        self.prefix = f"{prefix}:trainer"
        self._count_once = client.register_script(_COUNT_ONCE)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- jobs -------------------------------------------------------------------------------
    async def add_job(self, job: trainer_pb2.Job, trigger_key: str = "") -> tuple[str, bool]:
        """Stores a new job; with a trigger key, only if that trigger has no job yet. Returns the
        job id (the existing one for a repeated trigger) and whether it is new."""
        if trigger_key:
            won = await self.redis.set(self._k("trigger", trigger_key), job.id, nx=True)
            if not won:
                existing: Any = await self.redis.get(self._k("trigger", trigger_key))
                return text(existing), False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("job", job.id), job.SerializeToString())
            pipe.zadd(self._k("jobs"), {job.id: job.created_ms})
            await pipe.execute()
        return job.id, True

    async def save(self, job: trainer_pb2.Job) -> None:
        await self.redis.set(self._k("job", job.id), job.SerializeToString())

    async def job(self, job_id: str) -> trainer_pb2.Job | None:
        raw = await self.redis.get(self._k("job", job_id))
        return trainer_pb2.Job.FromString(raw) if raw else None

    async def jobs(self, limit: int = 20) -> list[trainer_pb2.Job]:
        ids: list[Any] = await self.redis.zrevrange(self._k("jobs"), 0, limit - 1)
        raws: list[Any] = (
            await self.redis.mget([self._k("job", text(i)) for i in ids]) if ids else []
        )
        return [trainer_pb2.Job.FromString(r) for r in raws if r]

    async def next_job(self) -> trainer_pb2.Job | None:
        """The oldest unfinished job: one interrupted by a restart comes before those queued
        after it."""
        ids: list[Any] = await self.redis.zrange(self._k("jobs"), 0, -1)
        raws: list[Any] = (
            await self.redis.mget([self._k("job", text(i)) for i in ids]) if ids else []
        )
        for raw in raws:
            job = trainer_pb2.Job.FromString(raw) if raw else None
            if job is not None and unfinished(job):
                return job
        return None

    # -- corrections ------------------------------------------------------------------------
    async def add_correction(self, c: Correction) -> bool:
        if not await self.redis.set(self._k("correction", c.request_id), "1", nx=True):
            return False
        await self.redis.xadd(
            self._k("corrections"),
            {
                "request_id": c.request_id,
                "question": c.question,
                "correction": c.correction,
                "offset": c.offset,
            },
            maxlen=100_000,
            approximate=True,
        )
        return True

    async def corrections(self, limit: int) -> list[Correction]:
        """The newest ``limit`` corrections, oldest first."""
        rows: Any = await self.redis.xrevrange(self._k("corrections"), count=limit)
        out = []
        for _, fields in reversed(rows):
            f = {text(k): text(v) for k, v in fields.items()}
            out.append(Correction(f["request_id"], f["question"], f["correction"], f["offset"]))
        return out

    # -- gate results ---------------------------------------------------------------------
    async def recall_accuracy(
        self, eval_key: str, adapter: str
    ) -> tuple[float, float, dict[str, int]] | None:
        raw: Any = await self.redis.get(self._k("gate", eval_key, adapter))
        if not raw:
            return None
        accuracy, macro_f1, predicted = json.loads(raw)
        return float(accuracy), float(macro_f1), dict(predicted)

    async def remember_accuracy(
        self, eval_key: str, adapter: str, result: tuple[float, float, dict[str, int]]
    ) -> None:
        await self.redis.set(self._k("gate", eval_key, adapter), json.dumps(result), ex=30 * 86400)

    # -- rollout policy ---------------------------------------------------------------------
    async def recall_scores(self, adapter: str, keys: list[str]) -> list[list[float] | None]:
        if not keys:
            return []
        raw = await self.redis.hmget(self._k("probe", adapter), keys)
        return [json.loads(r) if r is not None else None for r in raw]

    async def remember_scores(self, adapter: str, scores: dict[str, list[float]]) -> None:
        if scores:
            key = self._k("probe", adapter)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping={k: json.dumps(v) for k, v in scores.items()})
                pipe.expire(key, 30 * 86400)
                await pipe.execute()

    async def policy(self) -> dict[str, str]:
        raw: dict[Any, Any] = await self.redis.hgetall(self._k("policy"))  # type: ignore[misc]
        return {text(k): text(v) for k, v in raw.items()}

    async def set_policy(self, **fields: str) -> None:
        await self.redis.hset(self._k("policy"), mapping=fields)  # type: ignore[misc,arg-type]

    async def count_pair(
        self, adapter: str, request_id: str, agreement: float, error: bool
    ) -> bool:
        return bool(
            await self._count_once(
                keys=[self._k("shadow", adapter, "seen"), self._k("shadow", adapter)],
                args=[
                    request_id,
                    "pairs",
                    "1",
                    "agreement_sum",
                    str(agreement if not error else 0.0),
                    "errors",
                    "1" if error else "0",
                ],
            )
        )

    async def tally(self, adapter: str) -> ShadowTally:
        raw: dict[Any, Any] = await self.redis.hgetall(self._k("shadow", adapter))  # type: ignore[misc]
        d = {text(k): float(text(v)) for k, v in raw.items()}
        return ShadowTally(
            int(d.get("pairs", 0)),
            d.get("agreement_sum", 0.0),
            int(d.get("errors", 0)),
            int(d.get("feedback_shadow", 0)),
            int(d.get("feedback_live", 0)),
        )

    async def keep_pair(self, adapter: str, request_id: str, live: str, shadow: str) -> None:
        """The answers of a shadow pair that differed, for feedback that may come later."""
        key = self._k("shadow", adapter, "differing")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, request_id, json.dumps([live, shadow]))
            pipe.expire(key, PENDING_TTL_S)
            await pipe.execute()

    async def differing_pair(self, adapter: str, request_id: str) -> tuple[str, str] | None:
        raw: Any = await self.redis.hget(self._k("shadow", adapter, "differing"), request_id)  # type: ignore[misc]
        if not raw:
            return None
        live, shadow = json.loads(raw)
        return str(live), str(shadow)

    async def keep_feedback(self, request_id: str, rating: int, correction: str) -> None:
        """Feedback on a request, for a shadow pair that may come later."""
        await self.redis.set(
            self._k("feedback", request_id), json.dumps([rating, correction]), ex=PENDING_TTL_S
        )

    async def feedback(self, request_id: str) -> tuple[int, str] | None:
        raw: Any = await self.redis.get(self._k("feedback", request_id))
        if not raw:
            return None
        rating, correction = json.loads(raw)
        return int(rating), str(correction)

    async def count_vote(self, adapter: str, request_id: str, vote: str) -> bool:
        return bool(
            await self._count_once(
                keys=[self._k("shadow", adapter, "voted"), self._k("shadow", adapter)],
                args=[request_id, f"feedback_{vote}", "1"],
            )
        )
