"""The rollout policy: a registered adapter goes to shadow (or straight to live on request),
and shadow pairs and users' feedback decide whether it is promoted or retired
(services/trainer/rollout.py holds the decision rules; this module applies them).

The trainer owns the job records; the policy reports through :class:`JobLog` and changes the
rollout only through the infer service's AdapterAdmin RPCs (infer owns the rollout state).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2
from services.common import tracing
from services.common.adapters import AdapterRegistry
from services.common.kafka import BadEvent, parse_event
from services.common.limits import LimitExceeded
from services.trainer import rollout
from services.trainer.settings import TrainerSettings
from services.trainer.store import Correction, ShadowTally, TrainerStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobLog:
    """How the policy records what it did to a job: ``save`` stores it, ``event`` stores it
    and publishes a TrainingEvent (the trainer's own methods)."""

    save: Callable[[trainer_pb2.Job], Awaitable[None]]
    event: Callable[..., Awaitable[None]]


def parse_feedback(value: bytes | None) -> events_pb2.FeedbackEvent:
    event = parse_event(value, events_pb2.FeedbackEvent)
    if not event.request_id:
        raise BadEvent("FeedbackEvent without a request_id")
    return event


def correction_of(event: events_pb2.FeedbackEvent, where: str) -> Correction | None:
    """Feedback as a correction to train on; None for feedback without a correction or whose
    question the infer service no longer had (valid, but nothing to train on)."""
    if not event.correction.strip() or not event.question.strip():
        return None
    return Correction(event.request_id, event.question, event.correction.strip(), where)


def parse_correction(value: bytes | None, where: str) -> Correction | None:
    return correction_of(parse_feedback(value), where)


class RolloutPolicy:
    def __init__(
        self,
        settings: TrainerSettings,
        store: TrainerStore,
        registry: AdapterRegistry,
        admin: infer_pb2_grpc.AdapterAdminServiceStub,
        jobs: JobLog,
    ):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.admin = admin
        self.jobs = jobs
        # Shadow pairs and feedback arrive on two consumers; each read-modify-write of the
        # watched candidate's tallies happens under this lock.
        self.lock = asyncio.Lock()

    async def hand_over_or_note(self, job: trainer_pb2.Job) -> None:
        try:
            await self.hand_over(job)
        except grpc.aio.AioRpcError as exc:
            # The adapter stays registered (the job did not fail): people can still shadow or
            # promote it by hand.
            job.rollout = "manual"
            why = f"could not hand it to the rollout: {exc.code().name}: {exc.details()}"
            await self.jobs.event(job, "rollout_failed", [why])

    async def mode(self) -> str:
        return (await self.store.policy()).get("mode") or self.settings.trainer_policy

    async def hand_over(self, job: trainer_pb2.Job) -> None:
        """A registered adapter goes to shadow when the policy is auto (or straight to live when
        the job asked for it)."""
        if job.request.promote:
            reason = "promoted right after the gate, on request (no shadow phase)"
            await self.admin.Promote(
                infer_pb2.PromoteRequest(adapter=job.adapter_id, reason=f"trainer: {reason}"),
                timeout=self.settings.rpc_timeout_s * 12,
            )
            job.rollout = "promoted"
            await self.jobs.event(job, "promoted", [reason, *job.gate.reasons])
            return
        if job.request.no_rollout or await self.mode() != "auto":
            job.rollout = "manual"
            await self.jobs.save(job)
            return
        reason = f"policy: shadow after the gate passed (job {job.id})"
        await self.admin.SetRollout(
            infer_pb2.SetRolloutRequest(
                adapter=job.adapter_id,
                mode="shadow",
                share=self.settings.trainer_shadow_share,
                reason=reason,
            ),
            timeout=self.settings.rpc_timeout_s * 12,  # a first load into Triton takes seconds
        )
        async with self.lock:
            await self.store.set_policy(watching=job.adapter_id, job=job.id)
        job.rollout = "shadow"
        await self.jobs.event(job, "shadow", [reason])

    async def on_shadow_pair(self, value: bytes | None) -> None:
        event = parse_event(value, events_pb2.ShadowPairEvent)
        if not event.request_id or not event.shadow_adapter:
            raise BadEvent("ShadowPairEvent without request_id or shadow_adapter")
        async with self.lock:
            policy = await self.store.policy()
            watching = policy.get("watching", "")
            if event.shadow_adapter != watching:
                return
            await self.store.count_pair(
                watching, event.request_id, event.agreement, bool(event.shadow_error)
            )
            if not event.shadow_error and event.agreement < 1.0:
                # Kept before looking for feedback: whichever of the two comes second finds
                # the other (a vote counts once per request).
                await self.store.keep_pair(
                    watching, event.request_id, event.live_answer, event.shadow_answer
                )
                feedback = await self.store.feedback(event.request_id)
                if feedback is not None:
                    await self.vote(
                        watching,
                        event.request_id,
                        event.live_answer,
                        event.shadow_answer,
                        *feedback,
                    )
            await self.maybe_decide(watching, policy.get("job", ""))

    async def vote(
        self,
        adapter: str,
        request_id: str,
        live_answer: str,
        shadow_answer: str,
        rating: int,
        correction: str,
    ) -> None:
        side = rollout.judge_feedback(live_answer, shadow_answer, rating, correction)
        if side is not None:
            await self.store.count_vote(adapter, request_id, side)

    async def maybe_decide(self, adapter: str, job_id: str) -> None:
        tally = await self.store.tally(adapter)
        job = await self.store.job(job_id)
        if job is None:
            return
        s = self.settings
        rollout_state = await self.registry.rollout()
        if rollout_state.candidate != adapter:
            # Someone changed the rollout by hand: the policy stops watching.
            await self.store.set_policy(watching="", job="")
            return
        decision = rollout.decide(
            tally,
            rollout.RolloutThresholds(
                s.trainer_shadow_samples,
                s.trainer_min_agreement,
                s.trainer_max_shadow_errors,
                s.trainer_min_feedback_votes,
            ),
            job.gate.live_adapter,
            rollout_state.live,
            job.gate.accuracy - job.gate.live_accuracy,
        )
        if decision is None:
            return
        action, reasons = decision
        with tracing.continued(job.trace_id):  # the promotion is part of the job's trace
            await self._decide(job, adapter, action, reasons, tally)

    async def _decide(
        self,
        job: trainer_pb2.Job,
        adapter: str,
        action: str,
        reasons: list[str],
        tally: ShadowTally,
    ) -> None:
        s = self.settings
        reason = "; ".join(reasons)
        try:
            if action == "promote":
                await self.admin.Promote(
                    infer_pb2.PromoteRequest(adapter=adapter, reason=f"policy: {reason}"),
                    timeout=s.rpc_timeout_s * 12,
                )
                job.rollout = "promoted"
            else:
                await self.admin.SetRollout(
                    infer_pb2.SetRolloutRequest(mode="off", reason=f"policy: {reason}"),
                    timeout=s.rpc_timeout_s,
                )
                job.rollout = "retired"
        except grpc.aio.AioRpcError as exc:
            # Still watching: the next shadow pair tries the decision again.
            log.warning("policy could not %s %s: %s", action, adapter, exc.details())
            return
        await self.store.set_policy(watching="", job="")
        await self.jobs.event(
            job,
            job.rollout,
            reasons,
            shadow_pairs=tally.pairs,
            shadow_agreement=tally.agreement,
            shadow_errors=tally.errors,
        )

    async def on_feedback(self, value: bytes | None, where: str) -> None:
        """A correction is training data; any rated or corrected answer may also be a vote on
        the candidate in shadow (see services/trainer/rollout.py)."""
        event = parse_feedback(value)
        try:  # as the infer service caps them; a plain producer may not have
            self.settings.check_text("correction", event.correction, "limit_correction_chars")
            self.settings.check_text("comment", event.comment, "limit_comment_chars")
        except LimitExceeded as exc:
            raise BadEvent(f"FeedbackEvent: {exc}") from exc
        correction = correction_of(event, where)
        if correction is not None:
            await self.store.add_correction(correction)
        if not event.rating and not event.correction.strip():
            return
        async with self.lock:
            policy = await self.store.policy()
            watching = policy.get("watching", "")
            if not watching:  # no candidate in shadow: nothing to vote on
                return
            # Kept for a shadow pair still to come (the shadow call may finish after the
            # user answered); whichever of the two comes second finds the other.
            await self.store.keep_feedback(event.request_id, event.rating, event.correction)
            pair = await self.store.differing_pair(watching, event.request_id)
            if pair is None:
                return
            await self.vote(watching, event.request_id, *pair, event.rating, event.correction)
            await self.maybe_decide(watching, policy.get("job", ""))
