"""What the trainer does with a job, without gRPC: assemble the dataset, train in a child
process, gate, register with lineage, and hand the adapter to the rollout policy
(services/trainer/policy.py, which shadow pairs and feedback feed).

One job trains at a time (a worker task takes the oldest job that has not ended, so a job
interrupted by a restart is resumed first: its dataset is on disk and the training process
resumes from its last checkpoint).

Over 400 lines because a job's stages (dataset, training, gate, registration) are methods of
one class: each reads and updates the job, emits its events and honours its cancellation.
What does not need the job lives beside it: the child process (runner.py), the rollout policy
(policy.py), the gate's measurements (gate.py), dataset recipes (sources.py) and knowledge jobs
(knowledge_job.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2
from services.common import tracing
from services.common.adapters import BASE, AdapterRegistry, UnknownAdapter, store_adapter
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.importdir import resolve_import_path
from services.common.kafka import BadEvent, new_header, now_ms, parse_event
from services.common.knowledge import ScoreFn
from services.common.metrics import GATE_RESULTS, TRAINING_LOSS, TRAINING_TOKENS_PER_S
from services.common.models import resolve_llm_dir
from services.llm.llm import LLMRequest
from services.trainer import gate, knowledge_job
from services.trainer.data import Dataset, Example
from services.trainer.evaluation import LABELS
from services.trainer.policy import JobLog, RolloutPolicy
from services.trainer.recent import read_recent_chunks
from services.trainer.runner import TrainingFailed, run_training
from services.trainer.settings import TrainerSettings
from services.trainer.sources import Recipe, Search, Sources, build_dataset, read_labelled
from services.trainer.store import ENDED, TrainerStore
from services.trainer.train import TrainConfig

log = logging.getLogger(__name__)

Publish = Callable[[str, str, bytes], Awaitable[None]]
# (example, adapter) -> the candidate label Triton's score mode picks
Score = Callable[[Example, str], Awaitable[str]]


MAX_LABELLED_BYTES = 64 * 1024 * 1024


class JobCancelled(Exception):
    pass


def parse_retrain(value: bytes | None) -> events_pb2.RetrainRequested:
    event = parse_event(value, events_pb2.RetrainRequested)
    if not event.idempotency_key.strip():
        raise BadEvent("RetrainRequested without an idempotency_key")
    if any(not q.strip() for q in event.example_questions):
        raise BadEvent("RetrainRequested with an empty example question")
    return event


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
        logprobs: ScoreFn | None = None,
    ):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.admin = admin
        self.search = search
        self.score = score
        self.publish = publish
        self.recipe = recipe
        # Score mode on raw prompts (knowledge probes); None: knowledge jobs cannot run.
        self.logprobs = logprobs
        self.wake = asyncio.Event()
        self.changed = asyncio.Condition()
        self.process: asyncio.subprocess.Process | None = None
        self.running: str = ""
        self.cancelled: set[str] = set()
        self.policy = RolloutPolicy(settings, store, registry, admin, JobLog(self.save, self.event))
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
        """Validates and queues a job. InvalidArgument for bad input, UnknownAdapter (NotFound)
        for an unknown parent. A repeated trigger key returns the job it made the first time."""
        await self._checked(request)
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
            trace_id=tracing.current_trace_id() or tracing.new_trace().trace_id,
        )
        job_id, new = await self.store.add_job(job, trigger_key)
        if not new:
            existing = await self.store.job(job_id)
            assert existing is not None
            return existing, False
        await self.event(job, "queued", [request.reason or trigger])
        self.wake.set()
        return job, True

    async def _checked(self, request: trainer_pb2.TrainRequest) -> None:
        """Fills the request's mode and import path in, or raises InvalidArgument (or
        FailedPrecondition) naming what is wrong."""
        s = self.settings
        if request.mode == trainer_pb2.TRAIN_MODE_UNSPECIFIED:
            # Fixed at submission: a resumed job keeps the mode it started with.
            request.mode = (
                trainer_pb2.TRAIN_MODE_KNOWLEDGE
                if s.trainer_mode == "knowledge"
                else trainer_pb2.TRAIN_MODE_LABELLED
            )
        if request.since_ms < 0 or request.since_ms > now_ms() + 60_000:
            raise InvalidArgument("since_ms must be a time in the past (ms since epoch) or 0")
        if request.labelled_data:
            # A client names a file only inside the import directory (regular, size-capped);
            # the service's own setting is trusted.
            request.labelled_data = str(
                await asyncio.to_thread(
                    resolve_import_path,
                    request.labelled_data,
                    s.import_root(),
                    MAX_LABELLED_BYTES,
                )
            )
        path = request.labelled_data or s.trainer_labelled_data
        if path and request.mode == trainer_pb2.TRAIN_MODE_LABELLED:
            # Parsed off the event loop, and now, not in the worker.
            try:
                await asyncio.to_thread(read_labelled, path, request.limit)
            except ValueError as exc:
                raise InvalidArgument(f"labelled data {path}: {exc}") from exc
        if request.mode == trainer_pb2.TRAIN_MODE_KNOWLEDGE and self.logprobs is None:
            raise FailedPrecondition("this trainer cannot score knowledge probes")
        check_gate_overrides(request.gate, s)
        s.check_text("reason", request.reason, "limit_reason_chars")
        s.check_text("parent", request.parent, "limit_label_chars")
        s.check_list("questions", request.questions, "limit_train_questions", "limit_query_chars")
        if request.epochs and not 0 < request.epochs <= 20:
            raise InvalidArgument("epochs must be in (0, 20]")
        if request.max_tokens and request.max_tokens < 32:
            raise InvalidArgument("max_tokens must be at least 32")

    async def on_retrain(self, value: bytes | None) -> None:
        event = parse_retrain(value)
        with tracing.continued(event.header.trace_id):  # the job joins the request's trace
            await self._retrain(event)

    async def _retrain(self, event: events_pb2.RetrainRequested) -> None:
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
        except (InvalidArgument, FailedPrecondition) as exc:
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
            header=new_header("trainer", job.trace_id),  # "" (an older job): the current one
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
            raise NotFound(f"no job {job_id!r}")
        if job.state in ENDED:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state})")
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
        with tracing.continued(job.trace_id):  # registration and hand-over calls carry it
            await self._run(job)

    async def _run(self, job: trainer_pb2.Job) -> None:
        self.running = job.id
        job_dir = self.jobs_dir / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = json.loads(job.timings_json or "{}")
        try:
            if job.state == "registered":  # stopped before the hand-over: only that is left
                await self.policy.hand_over_or_note(job)
                return
            if not job.started_ms:
                job.started_ms = now_ms()
            if knowing(job):
                dataset = await self.knowledge_dataset(job, job_dir, timings)
            else:
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

    async def ancestors(self, adapter: str) -> list[str]:
        """Dataset hashes up an adapter's lineage (its own first), down to the base model."""
        out: list[str] = []
        seen: set[str] = set()
        while adapter and adapter != BASE and adapter not in seen:
            seen.add(adapter)
            info = await self.registry.get(adapter)
            if info is None:
                break
            digest = str(info.lineage.get("dataset_hash") or "")
            if digest:
                out.append(digest)
            adapter = info.parent
        return out

    async def knowledge_dataset(
        self, job: trainer_pb2.Job, job_dir: Path, timings: dict[str, float]
    ) -> Dataset:
        """The documents since the parent, their probes and training text (knowledge_job)."""
        path = job_dir / "dataset.json"
        if path.exists() and (job_dir / knowledge_job.PROBES_FILE).exists():
            return Dataset.from_json(json.loads(path.read_text(encoding="utf-8")))
        job.state = "assembling"
        await self.event(job, "assembling")
        t = time.perf_counter()
        created = 0
        if job.parent != BASE:
            info = await self.registry.get(job.parent)
            created = info.created_at_ms if info is not None else 0
        assert self.logprobs is not None
        data = await knowledge_job.assemble(
            self.settings,
            job,
            job_dir,
            created,
            await self.ancestors(job.parent),
            self.logprobs,
        )
        self._check_cancelled(job)
        if not data.dataset.train:
            raise ValueError("the assembled dataset has no training examples")
        timings["assemble_s"] = round(time.perf_counter() - t, 2)
        await self._keep_dataset(job, job_dir, data.dataset, timings)
        return data.dataset

    async def _keep_dataset(
        self, job: trainer_pb2.Job, job_dir: Path, dataset: Dataset, timings: dict[str, float]
    ) -> None:
        text = json.dumps(dataset.to_json())
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        (self.datasets_dir / f"{dataset.content_hash}.json").write_text(text, encoding="utf-8")
        path = job_dir / "dataset.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        job.dataset_hash = dataset.content_hash
        job.train_examples, job.eval_examples = len(dataset.train), len(dataset.eval)
        provenance = {k: v for k, v in dataset.provenance.items() if k != "replay_ids"}
        job.dataset_json = json.dumps(provenance, sort_keys=True)
        job.timings_json = json.dumps(timings)
        await self.save(job)

    async def dataset(
        self, job: trainer_pb2.Job, job_dir: Path, timings: dict[str, float]
    ) -> Dataset:
        path = job_dir / "dataset.json"
        if path.exists():  # a resumed job trains on exactly the data it started with
            return Dataset.from_json(json.loads(path.read_text(encoding="utf-8")))
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
                parent_dataset = Dataset.from_json(
                    json.loads(parent_file.read_text(encoding="utf-8"))
                )
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
        timings["assemble_s"] = round(time.perf_counter() - t, 2)
        await self._keep_dataset(job, job_dir, dataset, timings)
        return dataset

    def train_config(self, job: trainer_pb2.Job, parent_dir: str, job_dir: Path) -> TrainConfig:
        s, r = self.settings, job.request
        config = TrainConfig(
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
        if not knowing(job):
            return config
        return replace(
            config,
            lora_dropout=0.0,
            target_modules=list(s.trainer_knowledge_targets),
            epochs=r.epochs or s.trainer_knowledge_passes,
            # One document form per step: a batch of 50 documents is a few hundred steps a
            # pass (four to a micro-batch it was too few to learn from), and on a CPU
            # unpadded single rows cost no more per token.
            micro_batch=r.micro_batch or 1,
            grad_accum=r.grad_accum or 1,
            learning_rate=s.trainer_knowledge_learning_rate,
            dev_probes=str(job_dir / knowledge_job.DEV_FILE),
            stop_accuracy=s.trainer_stop_accuracy,
            patience=s.trainer_patience,
        )

    async def train(
        self, job: trainer_pb2.Job, job_dir: Path, dataset: Dataset, timings: dict[str, float]
    ) -> dict[str, Any]:
        self._check_cancelled(job)
        done_file = job_dir / "train-summary.json"
        if done_file.exists():
            return dict(json.loads(done_file.read_text(encoding="utf-8")))
        parent_dir = "" if job.parent == BASE else str(self.settings.adapter_dir / job.parent)
        config = self.train_config(job, parent_dir, job_dir)
        if not (job_dir / "config.json").exists():
            config.save(job_dir / "config.json")
            job.config_json = json.dumps(
                json.loads((job_dir / "config.json").read_text(encoding="utf-8"))
            )
        job.state = "training"
        await self.event(job, "training")
        t = time.perf_counter()

        def started(process: asyncio.subprocess.Process) -> None:
            self.process = process

        try:
            summary = await run_training(
                job_dir,
                self.settings.cache_dir,
                self.settings.trainer_progress_timeout_s,
                started,
                lambda line: self._on_training_line(job, line),
            )
        except TrainingFailed:
            self._check_cancelled(job)  # killed on purpose: cancelled, not failed
            raise
        self._check_cancelled(job)
        timings["train_s"] = round(time.perf_counter() - t, 2) + timings.get("train_s", 0.0)
        job.timings_json = json.dumps(timings)
        done_file.write_text(json.dumps(summary), encoding="utf-8")
        return summary

    async def _on_training_line(self, job: trainer_pb2.Job, line: dict[str, Any]) -> None:
        kind = line.get("event")
        if kind in ("progress", "resumed"):
            job.step, job.steps = int(line["step"]), int(line["steps"])
        if kind == "progress":
            job.loss = float(line["loss"])
            job.tokens_per_s = float(line["tokens_per_s"])
            job.eta_s = float(line["eta_s"])
            TRAINING_LOSS.labels(_mode(job)).set(job.loss)
            TRAINING_TOKENS_PER_S.labels(_mode(job)).set(job.tokens_per_s)
            await self.event(job, "progress")
        elif kind == "resumed":
            job.resumes += 1
            await self.event(job, "resumed", [f"from step {job.step}"])
        elif kind == "dev":
            message = f"pass {line['pass']}: dev-probe accuracy {line['accuracy']:.3f}"
            await self.event(job, "dev", [message])

    async def evaluate_and_register(
        self,
        job: trainer_pb2.Job,
        job_dir: Path,
        dataset: Dataset,
        summary: dict[str, Any],
        timings: dict[str, float],
    ) -> None:
        self._check_cancelled(job)
        s = self.settings
        job.state = "evaluating"
        await self.event(job, "evaluating")
        t = time.perf_counter()
        # Into the store (content-hash id) so Triton can load it; registered only if it passes.
        adapter_id, stored = await asyncio.to_thread(
            store_adapter, job_dir / "adapter", s.adapter_dir
        )
        already = await self.registry.get(adapter_id) is not None
        job.adapter_id = adapter_id
        if knowing(job):
            assert self.logprobs is not None
            passed, reasons, result = await knowledge_job.gate(
                s, job, job_dir, adapter_id, summary, self.logprobs
            )
            job.gate.CopyFrom(result)
        else:
            passed, reasons = await self._labelled_gate(job, dataset, adapter_id, summary)
        timings["gate_s"] = round(time.perf_counter() - t, 2)
        GATE_RESULTS.labels(_mode(job), "passed" if passed else "rejected").inc()
        job.timings_json = json.dumps(timings)
        job.finished_ms = now_ms()
        if not passed:
            if not already:  # keep it with the job for inspection, not in the store
                await asyncio.to_thread(shutil.rmtree, stored, True)
            job.state = "rejected"
            job.adapter_path = str(job_dir / "adapter")
            await self.event(job, "rejected", reasons)
            return
        await self.register(job, job_dir, dataset, summary, timings, reasons)

    async def _labelled_gate(
        self, job: trainer_pb2.Job, dataset: Dataset, adapter_id: str, summary: dict[str, Any]
    ) -> tuple[bool, list[str]]:
        s, r = self.settings, job.request
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
        return passed, reasons

    async def register(
        self,
        job: trainer_pb2.Job,
        job_dir: Path,
        dataset: Dataset,
        summary: dict[str, Any],
        timings: dict[str, float],
        reasons: list[str],
    ) -> None:
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
                for k in (
                    "steps",
                    "examples",
                    "train_tokens",
                    "tokens_per_s",
                    "final_loss",
                    "bf16",
                    "dev_accuracy",
                    "best_pass",
                )
            },
            "mode": "knowledge" if knowing(job) else "labelled",
        }
        if job.request.gate.force_reason:
            lineage["gate_forced"] = {
                "reason": job.request.gate.force_reason,
                "overrides": json_format.MessageToDict(
                    job.request.gate, preserving_proto_field_name=True
                ),
            }
        lineage["hyperparameters"].pop("model_dir", None)
        lineage["hyperparameters"].pop("parent_adapter", None)
        await self.registry.register(
            job_dir / "adapter",
            source_kind="trainer",
            parent=job.parent,
            description=job.reason or job.trigger,
            lineage=lineage,
            training_questions=[e.question for e in dataset.train if e.question],
        )
        job.state = "registered"
        await self.event(job, "registered", reasons)
        await self.policy.hand_over_or_note(job)


def _mode(job: Any) -> str:
    return "knowledge" if knowing(job) else "labelled"


def check_gate_overrides(g: trainer_pb2.GateOverrides, s: TrainerSettings) -> None:
    """ValueError for an override out of range, or looser than the service's gate without a
    recorded reason (a gate that passes anything is a way to make any adapter live)."""
    ranges = {
        "min_gain": (-1.0, 1.0),
        "max_forgetting_pct": (0.0, 100.0),
        "min_lower_bound": (0.0, 1.0),
        "min_retention": (0.0, 1.0),
    }
    for name, (low, high) in ranges.items():
        if g.HasField(name) and not low <= getattr(g, name) <= high:  # type: ignore[arg-type]
            raise InvalidArgument(f"gate.{name} must be in [{low}, {high}]")
    if g.HasField("min_eval_items") and g.min_eval_items < 1:
        raise InvalidArgument("gate.min_eval_items must be at least 1")
    if g.HasField("min_eval_items"):
        s.check_at_most("gate.min_eval_items", g.min_eval_items, "limit_gate_eval_items")
    s.check_text("gate.force_reason", g.force_reason, "limit_reason_chars")
    looser = [
        name
        for name, is_looser in (
            ("min_gain", g.HasField("min_gain") and g.min_gain < 0),
            (
                "max_forgetting_pct",
                g.HasField("max_forgetting_pct")
                and g.max_forgetting_pct > s.trainer_gate_max_forgetting_pct,
            ),
            (
                "min_retention",
                g.HasField("min_retention") and g.min_retention < s.trainer_gate_min_retention,
            ),
        )
        if is_looser
    ]
    if looser and not g.force_reason.strip():
        raise InvalidArgument(
            f"gate.{', gate.'.join(looser)} looser than the service's gate: give "
            "gate.force_reason (it is recorded with the job and the adapter)"
        )


def knowing(job: trainer_pb2.Job) -> bool:
    return job.request.mode == trainer_pb2.TRAIN_MODE_KNOWLEDGE


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
            patient=True,  # shed beside live traffic: wait for room
        )
        logprobs = generation.candidate_logprobs
        return LABELS[max(range(len(LABELS)), key=lambda i: logprobs[i])]

    return score
