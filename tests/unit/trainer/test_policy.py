"""The rollout policy with fakes for its neighbours: the trainer's store, the registry's
rollout and the infer service's AdapterAdmin RPCs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from knowstream.events.v1 import events_pb2
from knowstream.trainer.v1 import trainer_pb2
from services.common.kafka import new_header
from services.trainer.policy import JobLog, RolloutPolicy
from services.trainer.settings import TrainerSettings
from services.trainer.store import ShadowTally


@dataclass
class FakeStore:
    fields: dict[str, str] = field(default_factory=dict)
    tallies: dict[str, ShadowTally] = field(default_factory=dict)
    jobs: dict[str, trainer_pb2.Job] = field(default_factory=dict)

    async def policy(self) -> dict[str, str]:
        return dict(self.fields)

    async def set_policy(self, **fields: str) -> None:
        self.fields.update(fields)

    async def count_pair(self, adapter: str, request_id: str, agreement: float, error: bool):
        t = self.tallies.setdefault(adapter, ShadowTally())
        t.pairs += 1
        t.agreement_sum += 0 if error else agreement
        t.errors += int(error)

    async def keep_pair(self, *args: Any) -> None:
        pass

    async def feedback(self, request_id: str) -> None:
        return None

    async def tally(self, adapter: str) -> ShadowTally:
        return self.tallies.get(adapter, ShadowTally())

    async def job(self, job_id: str) -> trainer_pb2.Job | None:
        return self.jobs.get(job_id)


@dataclass
class FakeRollout:
    live: str = "live-1"
    candidate: str = ""


class FakeRegistry:
    def __init__(self) -> None:
        self.state = FakeRollout()

    async def rollout(self) -> FakeRollout:
        return self.state


class FakeAdmin:
    def __init__(self, registry: FakeRegistry):
        self.calls: list[tuple[str, Any]] = []
        self.registry = registry

    async def SetRollout(self, request: Any, **_: Any) -> None:
        self.calls.append(("SetRollout", request))
        self.registry.state.candidate = request.adapter if request.mode != "off" else ""

    async def Promote(self, request: Any, **_: Any) -> None:
        self.calls.append(("Promote", request))
        self.registry.state.live, self.registry.state.candidate = request.adapter, ""


def _policy(mode: str = "auto", samples: int = 3):
    settings = TrainerSettings(
        trainer_policy=mode, trainer_shadow_samples=samples, kafka_bootstrap="127.0.0.1:9"
    )
    store, registry = FakeStore(), FakeRegistry()
    admin = FakeAdmin(registry)
    events: list[tuple[str, str]] = []

    async def save(job: trainer_pb2.Job) -> None:
        store.jobs[job.id] = job

    async def event(job: trainer_pb2.Job, kind: str, reasons: Any = (), **extra: Any) -> None:
        store.jobs[job.id] = job
        events.append((job.id, kind))

    policy = RolloutPolicy(settings, store, registry, admin, JobLog(save, event))  # type: ignore[arg-type]
    return policy, store, admin, events


def _job(**request: Any) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        id="j1",
        adapter_id="a1",
        request=trainer_pb2.TrainRequest(**request),
        gate=trainer_pb2.GateResult(live_adapter="live-1", accuracy=0.6, live_accuracy=0.5),
    )


def test_auto_policy_shadows_a_registered_adapter_and_watches_it():
    policy, store, admin, events = _policy("auto")
    job = _job()
    asyncio.run(policy.hand_over(job))
    assert [(name, r.adapter, r.mode) for name, r in admin.calls] == [
        ("SetRollout", "a1", "shadow")
    ]
    assert store.fields == {"watching": "a1", "job": "j1"}
    assert job.rollout == "shadow" and events == [("j1", "shadow")]


def test_manual_policy_and_no_rollout_leave_the_rollout_alone():
    for policy, job in (
        (_policy("manual")[0], _job()),
        (_policy("auto")[0], _job(no_rollout=True)),
    ):
        asyncio.run(policy.hand_over(job))
        assert job.rollout == "manual"
        assert policy.admin.calls == []  # type: ignore[attr-defined]


def test_promote_on_request_skips_the_shadow_phase():
    policy, _, admin, events = _policy("manual")
    job = _job(promote=True)
    asyncio.run(policy.hand_over(job))
    assert [name for name, _ in admin.calls] == ["Promote"] and job.rollout == "promoted"
    assert events == [("j1", "promoted")]


def _pair(request_id: str, agreement: float) -> bytes:
    return events_pb2.ShadowPairEvent(
        header=new_header("infer"), request_id=request_id, shadow_adapter="a1", agreement=agreement
    ).SerializeToString()


def test_enough_agreeing_shadow_pairs_promote_the_candidate():
    policy, store, admin, events = _policy("auto", samples=3)
    job = _job()
    asyncio.run(policy.hand_over(job))
    for i in range(3):
        asyncio.run(policy.on_shadow_pair(_pair(f"r{i}", 1.0)))
    assert [name for name, _ in admin.calls] == ["SetRollout", "Promote"]
    assert store.jobs["j1"].rollout == "promoted" and store.fields["watching"] == ""
    assert events[-1] == ("j1", "promoted")


def test_disagreeing_shadow_pairs_retire_the_candidate():
    policy, store, admin, events = _policy("auto", samples=3)
    asyncio.run(policy.hand_over(_job()))
    for i in range(3):
        asyncio.run(policy.on_shadow_pair(_pair(f"r{i}", 0.0)))
    assert [(n, r.mode) for n, r in admin.calls][-1] == ("SetRollout", "off")
    assert store.jobs["j1"].rollout == "retired" and events[-1] == ("j1", "retired")


def test_pairs_of_another_adapter_are_ignored():
    policy, store, admin, _ = _policy("auto", samples=1)
    asyncio.run(policy.hand_over(_job()))
    other = events_pb2.ShadowPairEvent(
        header=new_header("infer"), request_id="r", shadow_adapter="zz", agreement=1.0
    )
    asyncio.run(policy.on_shadow_pair(other.SerializeToString()))
    assert [name for name, _ in admin.calls] == ["SetRollout"] and "zz" not in store.tallies
