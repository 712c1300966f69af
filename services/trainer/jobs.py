"""What the trainer does with a job, without gRPC: assemble the dataset, train in a child
process, gate, register with lineage, hand the adapter to the rollout policy; and the policy
itself, fed with shadow pairs.

One job trains at a time (a worker task takes the oldest job that has not ended, so a job
interrupted by a restart is resumed first: its dataset is on disk and the training process
resumes from its last checkpoint).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2
from services.common.adapters import BASE, AdapterRegistry, UnknownAdapter, store_adapter
from services.common.kafka import BadEvent, new_header, now_ms, parse_event
from services.common.keys import adapter_questions_key
from services.common.models import resolve_llm_dir
from services.infer.llm import LLMRequest
from services.trainer import gate, rollout
from services.trainer.data import Dataset, Example
from services.trainer.evaluation import LABELS
from services.trainer.recent import read_recent_chunks
from services.trainer.settings import TrainerSettings
from services.trainer.sources import Recipe, Search, Sources, build_dataset, read_labelled
from services.trainer.store import ENDED, Correction, TrainerStore
from services.trainer.train import DIE_WITH_PARENT, TrainConfig, child_env

log = logging.getLogger(__name__)

Publish = Callable[[str, str, bytes], Awaitable[None]]
# (example, adapter) -> the candidate label Triton's score mode picks
Score = Callable[[Example, str], Awaitable[str]]


class JobCancelled(Exception):
    pass


def parse_retrain(value: bytes | None) -> events_pb2.RetrainRequested:
    event = parse_event(value, events_pb2.RetrainRequested)
    if not event.idempotency_key.strip():
        raise BadEvent("RetrainRequested without an idempotency_key")
    if any(not q.strip() for q in event.example_questions):
        raise BadEvent("RetrainRequested with an empty example question")
    return event


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


class Trainer:
    def __init__(
        self,
        settings: TrainerSettings,
        store: TrainerStore,
        registry: AdapterRegistry,
        admin: infer_pb2_grpc.AdapterAdminServiceStub,
        search: Search,
        score: Score,
        publish: Publish,
        recipe: Recipe,
    ):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.admin = admin
        self.search = search
        self.score = score
        self.publish = publish
        self.recipe = recipe
        self.wake = asyncio.Event()
        self.changed = asyncio.Condition()
        self.process: asyncio.subprocess.Process | None = None
        self.running: str = ""
        self.cancelled: set[str] = set()
        self.policy_lock = asyncio.Lock()
        self.jobs_dir = settings.trainer_dir / "jobs"
        self.datasets_dir = settings.trainer_dir / "datasets"

    # -- jobs -------------------------------------------------------------------------------
    async def submit(
        self,
        request: trainer_pb2.TrainRequest,
        trigger: str = "manual",
        trigger_key: str = "",
        event_id: str = "",
    ) -> tuple[trainer_pb2.Job, bool]:
        """Validates and queues a job. ValueError for bad input, UnknownAdapter for an unknown
        parent. A repeated trigger key returns the job it made the first time."""
        s = self.settings
        path = request.labelled_data or s.trainer_labelled_data
        if path:
            read_labelled(path, request.limit)  # fail now, not in the worker
        if request.epochs and not 0 < request.epochs <= 20:
            raise ValueError("epochs must be in (0, 20]")
        if request.max_tokens and request.max_tokens < 32:
            raise ValueError("max_tokens must be at least 32")
        parent = await self.registry.resolve(request.parent or "live")
        job = trainer_pb2.Job(
            id=uuid.uuid4().hex[:12],
            state="queued",
            trigger=trigger,
            trigger_event_id=event_id,
            reason=request.reason,
            parent=parent,
            created_ms=now_ms(),
            request=request,
        )
        job_id, new = await self.store.add_job(job, trigger_key)
        if not new:
            existing = await self.store.job(job_id)
            assert existing is not None
            return existing, False
        await self.event(job, "queued", [request.reason or trigger])
        self.wake.set()
        return job, True

    async def on_retrain(self, value: bytes | None) -> None:
        event = parse_retrain(value)
        request = trainer_pb2.TrainRequest(
            parent=event.live_adapter or "live",
            reason=event.reason or "drift",
            questions=list(event.example_questions),
        )
        try:
            job, new = await self.submit(
                request,
                trigger=f"retrain:{event.idempotency_key}",
                trigger_key=event.idempotency_key,
                event_id=event.header.event_id,
            )
        except UnknownAdapter:
            # The adapter live when the drift was seen has gone: train from what is live now.
            request.parent = "live"
            job, new = await self.submit(
                request,
                f"retrain:{event.idempotency_key}",
                event.idempotency_key,
                event.header.event_id,
            )
        except ValueError as exc:
            raise BadEvent(f"cannot train on this request: {exc}") from exc
        log.info(
            "retrain request %s -> job %s (%s)",
            event.idempotency_key,
            job.id,
            "new" if new else "repeat",
        )

    async def save(self, job: trainer_pb2.Job) -> None:
        await self.store.save(job)
        async with self.changed:
            self.changed.notify_all()

    async def event(
        self, job: trainer_pb2.Job, kind: str, reasons: Sequence[str] = (), **extra: Any
    ) -> None:
        await self.save(job)
        event = events_pb2.TrainingEvent(
            header=new_header("trainer", job.id),
            job_id=job.id,
            kind=kind,
            step=job.step,
            steps=job.steps,
            loss=job.loss,
            tokens_per_s=job.tokens_per_s,
            eta_s=job.eta_s,
            adapter_id=job.adapter_id,
            reasons=list(reasons),
            **extra,
        )
        await self.publish(self.settings.topic_training, job.id, event.SerializeToString())

    async def cancel(self, job_id: str) -> trainer_pb2.Job:
        job = await self.store.job(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state in ENDED:
            raise ValueError(f"job {job_id} has already ended ({job.state})")
        self.cancelled.add(job_id)
        if self.running == job_id and self.process is not None:
            self.process.kill()
        if self.running != job_id:
            job.state, job.finished_ms = "cancelled", now_ms()
            await self.event(job, "cancelled")
        return job

    async def worker(self) -> None:
        while True:
            job = await self.store.next_job()
            if job is None:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=2.0)
                except TimeoutError:
                    pass
                continue
            await self.run(job)

    async def run(self, job: trainer_pb2.Job) -> None:
        self.running = job.id
        job_dir = self.jobs_dir / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = json.loads(job.timings_json or "{}")
        try:
            if job.state == "registered":  # stopped before the hand-over: only that is left
                await self.hand_over_or_note(job)
                return
            if not job.started_ms:
                job.started_ms = now_ms()
            dataset = await self.dataset(job, job_dir, timings)
            summary = await self.train(job, job_dir, dataset, timings)
            await self.evaluate_and_register(job, job_dir, dataset, summary, timings)
        except JobCancelled:
            job.state = "cancelled"
            job.finished_ms = now_ms()
            await self.event(job, "cancelled")
        except Exception as exc:
            log.exception("job %s failed", job.id)
            job.state, job.error, job.finished_ms = "failed", str(exc)[-2000:], now_ms()
            await self.event(job, "failed", [job.error])
        finally:
            self.running = ""
            self.process = None
            self.cancelled.discard(job.id)
            if job.state in ENDED:  # the adapter is saved; checkpoints only served a resume
                await asyncio.to_thread(shutil.rmtree, job_dir / "checkpoints", True)

    def _check_cancelled(self, job: trainer_pb2.Job) -> None:
        if job.id in self.cancelled:
            raise JobCancelled()

    async def dataset(
        self, job: trainer_pb2.Job, job_dir: Path, timings: dict[str, float]
    ) -> Dataset:
        path = job_dir / "dataset.json"
        if path.exists():  # a resumed job trains on exactly the data it started with
            return Dataset.from_json(json.loads(path.read_text()))
        job.state = "assembling"
        await self.event(job, "assembling")
        t = time.perf_counter()
        request = job.request
        parent_dataset = None
        s = self.settings
        # Recent documents: since the parent was trained, at most trainer_recent_hours back.
        since_ms = now_ms() - int(s.trainer_recent_hours * 3600_000)
        if job.parent != BASE:
            info = await self.registry.get(job.parent)
            if info is not None:
                since_ms = max(since_ms, info.created_at_ms)
            digest = (info.lineage.get("dataset_hash") if info else "") or ""
            parent_file = self.datasets_dir / f"{digest}.json"
            if digest and parent_file.exists():
                parent_dataset = Dataset.from_json(json.loads(parent_file.read_text()))
        sources = Sources(
            labelled_path=request.labelled_data or s.trainer_labelled_data,
            limit=request.limit,
            questions=list(request.questions),
            corrections=await self.store.corrections(s.trainer_max_corrections),
            parent_dataset=parent_dataset,
        )
        if s.trainer_recent_hours and self.recipe.max_recent_documents:
            read = await asyncio.to_thread(
                read_recent_chunks, s.kafka_bootstrap, s.topic_chunks, since_ms
            )
            sources.recent, sources.recent_since_ms = read.chunks, since_ms
            log.info(
                "job %s: %d chunks on %s since %d (%d unreadable)",
                job.id,
                len(read.chunks),
                s.topic_chunks,
                since_ms,
                read.unreadable,
            )
        dataset = await build_dataset(sources, self.recipe, self.search)
        self._check_cancelled(job)
        if not dataset.train:
            raise ValueError("the assembled dataset has no training examples")
        text = json.dumps(dataset.to_json())
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        (self.datasets_dir / f"{dataset.content_hash}.json").write_text(text)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        timings["assemble_s"] = round(time.perf_counter() - t, 2)
        job.dataset_hash = dataset.content_hash
        job.train_examples, job.eval_examples = len(dataset.train), len(dataset.eval)
        provenance = {k: v for k, v in dataset.provenance.items() if k != "replay_ids"}
        job.dataset_json = json.dumps(provenance, sort_keys=True)
        job.timings_json = json.dumps(timings)
        await self.save(job)
        return dataset

    def train_config(self, job: trainer_pb2.Job, parent_dir: str) -> TrainConfig:
        s, r = self.settings, job.request
        return TrainConfig(
            model_dir=str(resolve_llm_dir(s.llm_model, s.cache_dir)),
            backend=s.trainer_backend,
            parent_adapter=parent_dir,
            lora_r=s.trainer_lora_r,
            lora_alpha=2 * s.trainer_lora_r,
            epochs=r.epochs or s.trainer_epochs,
            micro_batch=r.micro_batch or s.trainer_micro_batch,
            grad_accum=r.grad_accum or s.trainer_grad_accum,
            learning_rate=s.trainer_learning_rate,
            max_tokens=r.max_tokens or s.trainer_max_tokens,
            checkpoint_every=r.checkpoint_every or s.trainer_checkpoint_every,
            ewc_lambda=s.trainer_ewc_lambda if parent_dir else 0.0,
            seed=s.trainer_seed,
            threads=s.trainer_threads,
            general_tokens=s.trainer_general_tokens,
        )

    async def train(
        self, job: trainer_pb2.Job, job_dir: Path, dataset: Dataset, timings: dict[str, float]
    ) -> dict[str, Any]:
        self._check_cancelled(job)
        done_file = job_dir / "train-summary.json"
        if done_file.exists():
            return dict(json.loads(done_file.read_text()))
        parent_dir = "" if job.parent == BASE else str(self.settings.adapter_dir / job.parent)
        config = self.train_config(job, parent_dir)
        if not (job_dir / "config.json").exists():
            config.save(job_dir / "config.json")
            job.config_json = json.dumps(json.loads((job_dir / "config.json").read_text()))
        job.state = "training"
        await self.event(job, "training")
        t = time.perf_counter()
        stderr = await asyncio.to_thread(open, job_dir / "train.log", "ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.trainer.train",
                str(job_dir),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**child_env(self.settings.cache_dir), DIE_WITH_PARENT: str(os.getpid())},
            )
            summary: dict[str, Any] = {}
            assert self.process.stdout is not None
            async for raw in self.process.stdout:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue  # a library printing to stdout
                if not isinstance(line, dict):
                    continue
                kind = line.get("event")
                if kind in ("progress", "resumed"):
                    job.step, job.steps = int(line["step"]), int(line["steps"])
                if kind == "progress":
                    job.loss = float(line["loss"])
                    job.tokens_per_s = float(line["tokens_per_s"])
                    job.eta_s = float(line["eta_s"])
                    await self.event(job, "progress")
                elif kind == "resumed":
                    job.resumes += 1
                    await self.event(job, "resumed", [f"from step {job.step}"])
                elif kind == "done":
                    summary = line
            code = await self.process.wait()
        finally:
            stderr.close()
        self._check_cancelled(job)
        if code != 0 or not summary:
            tail = (job_dir / "train.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"training process exited with {code}: {tail}")
        timings["train_s"] = round(time.perf_counter() - t, 2) + timings.get("train_s", 0.0)
        job.timings_json = json.dumps(timings)
        done_file.write_text(json.dumps(summary))
        return summary

    async def evaluate_and_register(
        self,
        job: trainer_pb2.Job,
        job_dir: Path,
        dataset: Dataset,
        summary: dict[str, Any],
        timings: dict[str, float],
    ) -> None:
        self._check_cancelled(job)
        s, r = self.settings, job.request
        job.state = "evaluating"
        await self.event(job, "evaluating")
        t = time.perf_counter()
        # Into the store (content-hash id) so Triton can load it; registered only if it passes.
        adapter_id, stored = await asyncio.to_thread(
            store_adapter, job_dir / "adapter", s.adapter_dir
        )
        already = await self.registry.get(adapter_id) is not None
        job.adapter_id = adapter_id
        live = (await self.registry.rollout()).live
        measured = await gate.measure(
            dataset.eval,
            adapter_id,
            live,
            self.score,
            s.trainer_gate_concurrency,
            (float(summary.get("base_perplexity", 0)), float(summary.get("perplexity", 0))),
            self.store.recall_accuracy,
            self.store.remember_accuracy,
        )
        g = r.gate
        thresholds = gate.Thresholds(
            min_gain=g.min_gain if g.HasField("min_gain") else s.trainer_gate_min_gain,
            max_forgetting_pct=(
                g.max_forgetting_pct
                if g.HasField("max_forgetting_pct")
                else s.trainer_gate_max_forgetting_pct
            ),
            min_eval_items=(
                g.min_eval_items if g.HasField("min_eval_items") else s.trainer_gate_min_eval_items
            ),
        )
        passed, reasons = gate.decide(measured, thresholds)
        timings["gate_s"] = round(time.perf_counter() - t, 2)
        job.gate.CopyFrom(
            trainer_pb2.GateResult(
                passed=passed,
                reasons=reasons,
                eval_items=measured.eval_items,
                accuracy=measured.accuracy,
                base_accuracy=measured.base_accuracy,
                live_accuracy=measured.live_accuracy,
                live_adapter=measured.live_adapter,
                base_perplexity=measured.base_perplexity,
                perplexity=measured.perplexity,
                forgetting_pct=measured.forgetting_pct,
                macro_f1=measured.macro_f1,
            )
        )
        job.timings_json = json.dumps(timings)
        job.finished_ms = now_ms()
        if not passed:
            if not already:  # keep it with the job for inspection, not in the store
                await asyncio.to_thread(shutil.rmtree, stored, True)
            job.state = "rejected"
            job.adapter_path = str(job_dir / "adapter")
            await self.event(job, "rejected", reasons)
            return
        lineage = {
            "job": job.id,
            "trigger": job.trigger,
            "trigger_event_id": job.trigger_event_id,
            "dataset_hash": dataset.content_hash,
            "dataset": json.loads(job.dataset_json or "{}"),
            "hyperparameters": json.loads(job.config_json or "{}"),
            "gate": json_format.MessageToDict(job.gate, preserving_proto_field_name=True),
            "timings": timings,
            "training": {
                k: summary.get(k)
                for k in ("steps", "examples", "train_tokens", "tokens_per_s", "final_loss", "bf16")
            },
        }
        lineage["hyperparameters"].pop("model_dir", None)
        lineage["hyperparameters"].pop("parent_adapter", None)
        info, _ = await self.registry.register(
            job_dir / "adapter",
            source_kind="trainer",
            parent=job.parent,
            description=job.reason or job.trigger,
            lineage=lineage,
        )
        questions = [e.question for e in dataset.train if e.question]
        if questions:
            key = adapter_questions_key(s.redis_prefix, info.id)
            async with self.registry.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.rpush(key, *questions)
                await pipe.execute()
        job.state = "registered"
        await self.event(job, "registered", reasons)
        await self.hand_over_or_note(job)

    async def hand_over_or_note(self, job: trainer_pb2.Job) -> None:
        try:
            await self.hand_over(job)
        except grpc.aio.AioRpcError as exc:
            # The adapter stays registered (the job did not fail): people can still shadow or
            # promote it by hand.
            job.rollout = "manual"
            why = f"could not hand it to the rollout: {exc.code().name}: {exc.details()}"
            await self.event(job, "rollout_failed", [why])

    # -- rollout policy ---------------------------------------------------------------------
    async def policy_mode(self) -> str:
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
            await self.event(job, "promoted", [reason, *job.gate.reasons])
            return
        if job.request.no_rollout or await self.policy_mode() != "auto":
            job.rollout = "manual"
            await self.save(job)
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
        async with self.policy_lock:
            await self.store.set_policy(watching=job.adapter_id, job=job.id)
        job.rollout = "shadow"
        await self.event(job, "shadow", [reason])

    async def on_shadow_pair(self, value: bytes | None) -> None:
        event = parse_event(value, events_pb2.ShadowPairEvent)
        if not event.request_id or not event.shadow_adapter:
            raise BadEvent("ShadowPairEvent without request_id or shadow_adapter")
        async with self.policy_lock:
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
        await self.event(
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
        correction = correction_of(event, where)
        if correction is not None:
            await self.store.add_correction(correction)
        if not event.rating and not event.correction.strip():
            return
        async with self.policy_lock:
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


def triton_score(llm: Any, timeout_s: float) -> Score:
    """Score mode through Triton: the label the model gives the highest log-probability."""

    async def score(example: Example, adapter: str) -> str:
        generation = await llm.generate(
            LLMRequest(
                prompt=example.prompt,
                system=example.system,
                adapter=adapter,
                max_new_tokens=1,
                candidates=list(LABELS),
            ),
            timeout_s,
        )
        logprobs = generation.candidate_logprobs
        return LABELS[max(range(len(LABELS)), key=lambda i: logprobs[i])]

    return score
