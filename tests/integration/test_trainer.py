"""The trainer through the real stack: a job trains SmolLM2-135M's LoRA with DeepSpeed (ZeRO-2,
CPU) in a child process, survives its trainer being killed, passes the gate (Triton score mode
with retrieved passages, perplexity on general English), is registered with lineage, goes to
shadow and is promoted by the policy; an adapter failing the gate is kept out; retrain requests
are validated, de-duplicated and dead-lettered.

Over 400 lines because these are one area's integration tests on the session stack, sharing
the module's clients and data; split, each part would repeat the fixtures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from kafka import KafkaProducer

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.documents import ensure_ingested
from services.common import tracing
from services.common.adapter_upload import upload_adapter
from services.common.adapters import AdapterRegistry, create_random_adapter
from services.common.clients import sync_channel
from services.common.kafka import new_header
from services.common.models import resolve_llm_dir
from services.common.redisutil import connect
from services.trainer.recent import read_recent_chunks
from services.trainer.store import TrainerStore
from tests.integration.conftest import read_dead_letters, read_events, wait_for

pytestmark = pytest.mark.integration

LABELS = ["yes", "no", "maybe"]


@pytest.fixture(scope="module")
def trainer(stack):
    return trainer_pb2_grpc.TrainerServiceStub(
        sync_channel(stack.settings.address(stack.settings.trainer_port))
    )


@pytest.fixture(scope="module")
def admin(stack):
    return infer_pb2_grpc.AdapterAdminServiceStub(
        sync_channel(stack.settings.address(stack.settings.infer_port))
    )


@pytest.fixture(scope="module")
def infer(stack):
    return infer_pb2_grpc.InferServiceStub(
        sync_channel(stack.settings.address(stack.settings.infer_port))
    )


@pytest.fixture(scope="module")
def labelled(stack, pubmedqa):
    """The stack's labelled file, its abstracts ingested (so training prompts hold retrieved
    passages, as served)."""
    path = Path(os.environ["KS_TRAINER_LABELLED_DATA"])
    data = json.loads(path.read_text(encoding="utf-8"))
    address = stack.settings.address
    ensure_ingested(
        data,
        ingest_pb2_grpc.IngestServiceStub(sync_channel(address(stack.settings.ingest_port))),
        retrieve_pb2_grpc.RetrieveServiceStub(sync_channel(address(stack.settings.retrieve_port))),
        180,
    )
    return path


def lenient(**kw) -> trainer_pb2.TrainRequest:
    """A new LoRA whose gate accepts any accuracy and up to 100 % more perplexity: the tests
    check the mechanics, not what a few steps on 13 items learn."""
    request = trainer_pb2.TrainRequest(parent="base", **kw)
    request.gate.min_gain = -1.0
    request.gate.max_forgetting_pct = 100.0
    request.gate.force_reason = "test: the gate's mechanics, not its thresholds"
    return request


def finished(trainer, job_id: str, timeout_s: float = 420) -> trainer_pb2.Job:
    def ended():
        job = trainer.GetJob(trainer_pb2.GetJobRequest(id=job_id), timeout=10)
        return job if job.state in ("registered", "rejected", "failed", "cancelled") else None

    return wait_for(ended, timeout_s, f"job {job_id} to end", interval_s=1)


def training_processes(job_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"services.trainer.train" in cmd and any(job_id.encode() in c for c in cmd):
                pids.append(int(entry.name))
    return pids


def retrain_request(key: str, questions: list[str], live: str) -> events_pb2.RetrainRequested:
    return events_pb2.RetrainRequested(
        header=new_header("monitor"),
        idempotency_key=key,
        reference_id="test-reference",
        reason="integration: 2 consecutive drifted windows",
        example_questions=questions,
        live_adapter=live,
    )


def publish(settings, topic: str, *values: bytes, traceparent: str = "") -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    headers = [(tracing.TRACEPARENT, traceparent.encode())] if traceparent else None
    for value in values:
        producer.send(topic, value, key=b"k", headers=headers)
    producer.flush()
    producer.close()


def jobs_for(trainer, trigger: str) -> list:
    jobs = trainer.ListJobs(trainer_pb2.ListJobsRequest(limit=100), timeout=10).jobs
    return [j for j in jobs if j.trigger == trigger]


def test_the_loop_trains_resumes_gates_registers_shadows_and_promotes(
    stack, trainer, admin, infer, labelled
):
    s = stack.settings
    trainer.SetPolicy(trainer_pb2.SetPolicyRequest(mode="auto"), timeout=10)
    try:
        # A document ingested just now: recent domain text for the next job.
        fresh = ingest_pb2.Document(
            id=f"recent-{time.time_ns()}",
            title="Statins after stroke",
            text="A cohort study of statin use after ischaemic stroke and later outcomes. " * 8,
        )
        ingest = ingest_pb2_grpc.IngestServiceStub(sync_channel(s.address(s.ingest_port)))
        ingest.IngestDocuments(ingest_pb2.IngestDocumentsRequest(documents=[fresh]), timeout=30)
        # What the monitor publishes when live questions drift.
        items = list(json.loads(labelled.read_text(encoding="utf-8")).values())
        live_before = admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10).live
        key = f"test-reference:retrain:{time.time_ns()}"
        event = retrain_request(key, [i["QUESTION"] for i in items[:3]], live_before)
        trace = tracing.new_trace()  # the request's trace follows it to the promotion
        publish(s, s.topic_retrain, event.SerializeToString(), traceparent=trace.header())
        job = wait_for(lambda: jobs_for(trainer, f"retrain:{key}"), 60, "the retrain job")[0]
        assert job.trigger_event_id == event.header.event_id and job.parent == live_before
        assert job.trace_id == trace.trace_id
        assert list(job.request.questions) == list(event.example_questions)

        # Kill the trainer (only its process) mid-run: the training process dies with it.
        def stepped():
            j = trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10)
            return j if j.state == "training" and j.step >= 2 else None

        running = wait_for(stepped, 300, "two training steps", interval_s=0.2)
        assert running.steps > running.step, "the run ended before it could be interrupted"
        assert training_processes(job.id)
        os.kill(stack.components["trainer"].pid, signal.SIGKILL)
        wait_for(lambda: not training_processes(job.id), 20, "the training process to die")
        stack.stop("trainer")
        stack.start_service("trainer")
        stack.wait_serving(["trainer"], 180)

        done = finished(trainer, job.id)
        assert done.state == "registered", (done.error, list(done.gate.reasons))
        # The request's questions brought their retrieved passages as domain text.
        provenance = json.loads(done.dataset_json)
        counts = provenance["counts"]
        assert counts.get("document", 0) >= 1
        # ... and recently ingested documents, with the chunk topic's offsets they came from.
        recent = provenance["recent_documents"]
        assert 1 <= recent["used"] <= 3 and recent["read"] >= 1, recent
        assert all(k.startswith(f"{s.topic_chunks}:") for k in recent["offsets"]), recent
        assert done.resumes >= 1 and done.step == done.steps
        assert done.gate.passed and done.gate.eval_items >= 1
        assert done.gate.base_perplexity > 1 and done.gate.perplexity > 1
        adapter = done.adapter_id

        # Registered with lineage, and the questions it trained on recorded for the monitor.
        status = admin.GetAdapter(infer_pb2.GetAdapterRequest(adapter=adapter), timeout=10)
        lineage = json.loads(status.lineage_json)
        assert status.source == "trainer" and status.parent == live_before
        assert lineage["dataset_hash"] == done.dataset_hash and lineage["job"] == done.id
        assert lineage["trigger"] == f"retrain:{key}"
        assert lineage["trigger_event_id"] == event.header.event_id
        assert lineage["hyperparameters"]["backend"] == "deepspeed"
        assert lineage["gate"]["passed"] and "train_s" in lineage["timings"]
        questions = asyncio.run(_training_questions(s, adapter))
        # The questions it trained on: labelled ones (eval items held out) and those of users'
        # corrections from earlier tests; documents have none.
        assert set(questions) & {i["QUESTION"] for i in items}
        assert len(questions) == done.train_examples - counts.get("document", 0)
        # ... which the drift monitor can take as its reference ("what this adapter knows").
        monitor = monitor_pb2_grpc.MonitorServiceStub(sync_channel(s.address(s.monitor_port)))
        reference = monitor.SetReference(
            monitor_pb2.SetReferenceRequest(adapter=adapter, description="trained on"), timeout=60
        )
        assert reference.source == "adapter" and reference.size == len(questions)
        shown = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "adapters", "show", adapter],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "lineage (newest first)" in shown and done.dataset_hash in shown

        # The policy put it in shadow; after 3 shadow pairs it promotes it.
        rollout = admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10)
        assert rollout.candidate == adapter and rollout.mode == "shadow"
        asked = []
        for question in items:
            reply = infer.Ask(
                infer_pb2.AskRequest(question=question["QUESTION"], candidates=LABELS), timeout=120
            )
            asked.append(reply.request_id)
            if len(asked) == 3:
                break
        # A correction on one of the answers becomes training data of the next job.
        infer.SubmitFeedback(
            infer_pb2.FeedbackRequest(request_id=asked[0], rating=-1, correction="maybe"),
            timeout=10,
        )
        wait_for(
            lambda: admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10).live == adapter,
            120,
            "the policy to promote the adapter",
        )
        promoted = read_events(
            s,
            s.topic_training,
            events_pb2.TrainingEvent,
            lambda e: e.job_id == job.id and e.kind == "promoted",
        )
        assert promoted.shadow_pairs >= 3 and promoted.adapter_id == adapter
        assert any("shadow pairs" in r for r in promoted.reasons)
        audit = read_events(
            s,
            s.topic_adapters,
            events_pb2.AdapterEvent,
            lambda e: e.action == "promoted" and e.adapter_id == adapter,
        )
        assert audit.reason.startswith("policy:") and audit.header.trace_id == trace.trace_id
        for kind in ("queued", "training", "progress", "resumed", "registered", "shadow"):
            step = read_events(
                s,
                s.topic_training,
                events_pb2.TrainingEvent,
                lambda e, k=kind: e.job_id == job.id and e.kind == k,
            )
            assert step.header.trace_id == trace.trace_id, kind
        assert promoted.header.trace_id == trace.trace_id
        for action in ("candidate", "promoted"):  # the rollout events, from the infer service
            audit = read_events(
                s,
                s.topic_adapters,
                events_pb2.AdapterEvent,
                lambda e, a=action: e.action == a and e.adapter_id == adapter,
            )
            assert audit.header.trace_id == trace.trace_id, action
        assert (
            trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10).rollout == "promoted"
        )
        status = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "status", "--json"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        assert json.loads(status)["training"]["policy"] == "auto"
    finally:
        trainer.SetPolicy(trainer_pb2.SetPolicyRequest(mode="manual"), timeout=10)
    # People can always undo it.
    after = admin.Rollback(infer_pb2.RollbackRequest(reason="test over"), timeout=60)
    assert after.live == live_before


def test_an_adapter_that_fails_the_gate_is_kept_out(stack, trainer, admin, labelled):
    s = stack.settings
    before = admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10)
    request = lenient(reason="integration: gate failure")
    request.gate.min_gain = 1.0  # no adapter gains 100 points
    job = finished(trainer, trainer.Train(request, timeout=30).id)
    assert job.state == "rejected", job.error
    assert not job.gate.passed
    assert any("< +1.000" in r for r in job.gate.reasons), list(job.gate.reasons)
    assert (Path(job.adapter_path) / "adapter_model.safetensors").exists()
    with pytest.raises(grpc.RpcError) as err:
        admin.GetAdapter(infer_pb2.GetAdapterRequest(adapter=job.adapter_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10)
    assert (after.live, after.candidate) == (before.live, before.candidate)
    event = read_events(
        s,
        s.topic_training,
        events_pb2.TrainingEvent,
        lambda e: e.job_id == job.id and e.kind == "rejected",
    )
    assert list(event.reasons) == list(job.gate.reasons)
    # The correction given in the previous test was part of this job's data.
    assert json.loads(job.dataset_json).get("corrections", {}).get("count", 0) >= 1


def test_an_interrupted_hand_over_is_finished_and_feedback_can_retire_the_candidate(
    stack, trainer, admin, tmp_path
):
    """The trainer stopped between registering an adapter and handing it to the rollout: the
    job is found again and the hand-over done. In shadow, users' feedback on the live answers
    where the two answered differently favours live, and the policy retires the candidate."""
    s = stack.settings
    model_dir = resolve_llm_dir(s.llm_model, s.cache_dir)
    path = create_random_adapter(model_dir, tmp_path / "adapter", seed=21, scale=0.05)
    adapter = upload_adapter(admin, path, timeout=120).id
    before = admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10)
    job = trainer_pb2.Job(
        id=f"handover{time.time_ns() % 10**9}",
        state="registered",
        trigger="manual",
        parent=before.live or "base",
        created_ms=int(time.time() * 1000),
        adapter_id=adapter,
        request=trainer_pb2.TrainRequest(reason="integration: interrupted hand-over"),
    )
    job.gate.live_adapter = before.live

    async def leave_it_registered() -> None:
        client = aioredis.Redis.from_url(s.redis_url)
        try:
            await TrainerStore(client, s.redis_prefix).add_job(job)
        finally:
            await client.aclose()

    def current():
        return trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10)

    trainer.SetPolicy(trainer_pb2.SetPolicyRequest(mode="auto"), timeout=10)
    try:
        asyncio.run(leave_it_registered())
        done = wait_for(lambda: current().rollout and current(), 300, "the hand-over")
        assert done.rollout == "shadow" and done.state == "registered"
        rollout = admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10)
        assert (rollout.candidate, rollout.mode, rollout.live) == (adapter, "shadow", before.live)

        # What the infer service publishes: three requests where live and shadow answered
        # differently, and feedback on them favouring the live answers (good ratings, a
        # correction matching live), some before their pair, one after it. The third pair
        # makes the decision, with all three votes in.
        live_answer, shadow_answer = "Yes, it lowers the risk.", "No, it raises the risk."
        ids = [f"{job.id}-r{i}" for i in range(3)]
        key = f"{s.redis_prefix}:trainer"
        r = redis.Redis.from_url(s.redis_url)

        def pair(request_id: str) -> bytes:
            return events_pb2.ShadowPairEvent(
                header=new_header("infer"),
                request_id=request_id,
                question="Does it lower the risk?",
                live_adapter=before.live,
                shadow_adapter=adapter,
                live_answer=live_answer,
                shadow_answer=shadow_answer,
                agreement=0.5,
            ).SerializeToString()

        def feedback(request_id: str, **kw) -> bytes:
            return events_pb2.FeedbackEvent(
                header=new_header("infer"), request_id=request_id, **kw
            ).SerializeToString()

        publish(s, s.topic_feedback, feedback(ids[0], rating=1), feedback(ids[2], rating=1))
        wait_for(
            lambda: r.exists(f"{key}:feedback:{ids[0]}", f"{key}:feedback:{ids[2]}") == 2,
            60,
            "the trainer to keep the feedback",
        )
        publish(s, s.topic_shadow, pair(ids[0]), pair(ids[1]))
        wait_for(lambda: r.hlen(f"{key}:shadow:{adapter}:differing") == 2, 60, "two pairs")
        publish(s, s.topic_feedback, feedback(ids[1], rating=-1, correction="Yes, it lowers it."))
        wait_for(lambda: r.scard(f"{key}:shadow:{adapter}:voted") == 2, 60, "two votes")
        publish(s, s.topic_shadow, pair(ids[2]))

        retired = read_events(
            s,
            s.topic_training,
            events_pb2.TrainingEvent,
            lambda e: e.job_id == job.id and e.kind == "retired",
            timeout_s=60,
        )
        assert any("0 for the candidate, 3 for live" in reason for reason in retired.reasons), list(
            retired.reasons
        )
        assert retired.shadow_pairs == 3
        after = admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10)
        assert after.live == before.live and after.mode != "shadow"
        assert current().rollout == "retired"
    finally:
        trainer.SetPolicy(trainer_pb2.SetPolicyRequest(mode="manual"), timeout=10)
        if admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=10).candidate == adapter:
            admin.SetRollout(
                infer_pb2.SetRolloutRequest(mode="off", reason="test over"), timeout=60
            )


def test_retrain_requests_are_validated_deduplicated_and_cancellable(stack, trainer):
    s = stack.settings
    key = f"test-ref:retrain:{time.time_ns()}"
    no_key = events_pb2.RetrainRequested(header=new_header("test"), example_questions=["q?"])
    good = retrain_request(key, ["Is aspirin useful after a heart attack?"], "base")
    # The good one twice (a redelivery): one job.
    bad = (b"not a protobuf", no_key.SerializeToString())
    publish(s, s.topic_retrain, *bad, good.SerializeToString(), good.SerializeToString())
    letters = read_dead_letters(s, s.topic_retrain, 2)
    reasons = " | ".join(letter.reason for letter in letters)
    assert "not a RetrainRequested protobuf" in reasons
    assert "RetrainRequested without an idempotency_key" in reasons
    assert all(letter.consumer == "trainer" for letter in letters)

    wait_for(lambda: jobs_for(trainer, f"retrain:{key}"), 60, "a job for the retrain request")
    time.sleep(3)  # the redelivered copy has been consumed by now
    found = jobs_for(trainer, f"retrain:{key}")
    assert len(found) == 1
    job = found[0]
    assert job.trigger_event_id == good.header.event_id and job.reason == good.reason
    assert list(job.request.questions) == list(good.example_questions)
    cancelled = trainer.CancelJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10)
    assert cancelled.id == job.id
    assert finished(trainer, job.id, 120).state == "cancelled"
    assert not training_processes(job.id)
    with pytest.raises(grpc.RpcError) as err:
        trainer.CancelJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_recent_chunks_are_read_back_by_time_in_their_newest_version(stack):
    """What the trainer reads as recently ingested text, from the real broker: records since a
    time, a re-ingested document in its newest version only, a deleted one left out."""
    s = stack.settings
    topic = f"test.recent.{time.time_ns()}"
    producer = KafkaProducer(bootstrap_servers=s.kafka_bootstrap)

    def chunk(doc: str, version: str, index: int) -> bytes:
        return events_pb2.KnowledgeEvent(
            chunk=events_pb2.ChunkEvent(
                header=new_header("ingest"),
                chunk_id=f"{doc}#{version}#{index}",
                doc_id=doc,
                content_hash=version,
                text="t",
            )
        ).SerializeToString()

    def send(*records: tuple[str, bytes]) -> None:
        for key, value in records:
            producer.send(topic, value, key=key.encode())
        producer.flush()

    send(("before", chunk("before", "v1", 0)))
    time.sleep(1.0)
    since = int(time.time() * 1000)
    time.sleep(0.2)
    deleted = events_pb2.KnowledgeEvent(
        deleted=events_pb2.DocumentDeleted(header=new_header("ingest"), doc_id="gone")
    )
    send(
        ("a", chunk("a", "v1", 0)),
        ("a", chunk("a", "v1", 1)),
        ("b", chunk("b", "v1", 0)),
        ("a", chunk("a", "v2", 0)),
        ("gone", chunk("gone", "v1", 0)),
        ("gone", deleted.SerializeToString()),
        ("junk", b"\xff\xfe not a protobuf"),
    )
    producer.close()
    read = read_recent_chunks(s.kafka_bootstrap, topic, since)
    assert sorted(c.chunk_id for c in read.chunks) == ["a#v2#0", "b#v1#0"]
    assert read.deleted == {"gone"} and read.unreadable == 1
    assert all(c.offset.startswith(f"{topic}:") for c in read.chunks)


def test_bad_train_requests_are_refused(trainer, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        trainer.Train(
            trainer_pb2.TrainRequest(labelled_data=str(tmp_path / "none.json")), timeout=10
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "none.json" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        trainer.Train(trainer_pb2.TrainRequest(parent="0123456789abcdef"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        trainer.GetJob(trainer_pb2.GetJobRequest(id="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def _training_questions(settings, adapter: str) -> list[str]:
    client = connect(settings.redis_url)
    try:
        return await AdapterRegistry(client, settings).training_questions(adapter, 10_000)
    finally:
        await client.aclose()
