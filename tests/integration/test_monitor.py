"""The drift monitor through the real broker, Redis, embed, retrieve and infer services: no event
on a steady stream, a knowledge gap for questions whose documents are missing, a retrain request
when questions switch MeSH group (then a cooldown), dead letters, and a restart that resumes.

Live traffic here is what the infer service publishes for each answer: an InferenceEvent with
the question, its query embedding and the retrieved chunks. The tests build these events from
the real retrieve service's answers (a real LLM answer per question would take minutes on this
CPU and does not change what the monitor reads); one test checks the infer service's own
events reach the monitor.

Over 400 lines because these are one area's integration tests on the session stack, sharing
the module's clients and data; split, each part would repeat the fixtures.
"""

from __future__ import annotations

import random
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaProducer

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.cli.documents import pubmedqa_document
from services.cli.main import main as cli_main
from services.common.clients import sync_channel
from services.common.kafka import new_header
from services.trainer.evaluation import mesh_groups
from tests.integration.conftest import read_events, wait_for

pytestmark = pytest.mark.integration

WINDOW = 32  # the default window


def stub(stack, cls, port: int):
    return cls(sync_channel(stack.settings.address(port)))


@pytest.fixture(scope="module")
def monitor(stack):
    return stub(stack, monitor_pb2_grpc.MonitorServiceStub, stack.settings.monitor_port)


@pytest.fixture(scope="module")
def retrieve(stack):
    return stub(stack, retrieve_pb2_grpc.RetrieveServiceStub, stack.settings.retrieve_port)


@pytest.fixture(scope="module")
def ingest(stack):
    return stub(stack, ingest_pb2_grpc.IngestServiceStub, stack.settings.ingest_port)


@pytest.fixture(scope="module")
def groups(pubmedqa):
    """PMIDs of adult-only and paediatric-only items (175 and 61), shuffled."""
    adult, child = mesh_groups(pubmedqa)
    random.Random(0).shuffle(adult)
    random.Random(0).shuffle(child)
    return adult, child


def searchable(retrieve, pmid: str, question: str) -> bool:
    hits = retrieve.Search(
        retrieve_pb2.SearchRequest(
            query=question, k=5, filters=retrieve_pb2.SearchFilters(doc_ids=[pmid])
        ),
        timeout=10,
    ).hits
    return bool(hits)


@pytest.fixture(scope="module")
def corpus(ingest, retrieve, pubmedqa):
    """All 500 abstracts indexed (a no-op when an earlier test module ingested them)."""
    docs = [pubmedqa_document(k, v) for k, v in pubmedqa.items()]
    reply = ingest.IngestDocumentStream(iter(docs), timeout=300)
    assert reply.rejected == 0
    missing = set(pubmedqa)

    def indexed() -> bool:
        for pmid in list(missing):
            if searchable(retrieve, pmid, pubmedqa[pmid]["QUESTION"]):
                missing.discard(pmid)
        return not missing

    wait_for(indexed, 600, "the abstracts to be searchable")
    return pubmedqa


class Traffic:
    """Publishes inference events as the infer service does, from real retrieval results."""

    def __init__(self, stack, retrieve, pubmedqa):
        self.settings = stack.settings
        self.retrieve = retrieve
        self.pubmedqa = pubmedqa
        self.producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all")

    def event(self, question: str) -> events_pb2.InferenceEvent:
        search = self.retrieve.Search(
            retrieve_pb2.SearchRequest(query=question, k=5, include_query_embedding=True),
            timeout=10,
        )
        request_id = uuid.uuid4().hex
        return events_pb2.InferenceEvent(
            header=new_header("test-traffic", request_id),
            request_id=request_id,
            question=question,
            query_embedding=search.query_embedding,
            embedding_model=search.embedding_model,
            retrieved=[
                events_pb2.RetrievedChunk(
                    doc_id=h.doc_id,
                    chunk_id=h.chunk_id,
                    score=h.score,
                    dense_score=h.dense_score,
                    bm25_score=h.bm25_score,
                )
                for h in search.hits
            ],
            adapter="base",
            route="live",
            answer="yes",
            confidence=0.7,
            candidates=["yes", "no", "maybe"],
        )

    def send_event(self, event: events_pb2.InferenceEvent, key: str = "") -> None:
        self.producer.send(
            self.settings.topic_inference,
            value=event.SerializeToString(),
            key=(key or event.request_id).encode(),
        )

    def send(self, pmids: list[str]) -> list[events_pb2.InferenceEvent]:
        events = [self.event(self.pubmedqa[p]["QUESTION"]) for p in pmids]
        for e in events:
            self.send_event(e)
        self.producer.flush()
        return events

    def send_raw(self, topic: str, value: bytes, key: str) -> None:
        self.producer.send(topic, value=value, key=key.encode())
        self.producer.flush()


@pytest.fixture(scope="module")
def traffic(stack, retrieve, corpus):
    t = Traffic(stack, retrieve, corpus)
    yield t
    t.producer.close()


def status(monitor, windows: int = 50) -> monitor_pb2.DriftStatus:
    return monitor.GetDriftStatus(monitor_pb2.GetDriftStatusRequest(windows=windows), timeout=10)


def events(monitor) -> list[events_pb2.DriftEvent]:
    return list(monitor.ListEvents(monitor_pb2.ListEventsRequest(limit=1000), timeout=10).events)


def next_window(monitor) -> int:
    ws = status(monitor, 1).windows
    return ws[-1].index + 1 if ws else 0


def wait_seen(monitor, count: int, timeout_s: float = 60) -> monitor_pb2.DriftStatus:
    return wait_for(
        lambda: (s := status(monitor)).questions_seen >= count and s,
        timeout_s,
        f"the monitor to have seen {count} questions",
    )


def assert_within_two_windows(event, switch: int, ref_id: str, kind: str) -> None:
    """The event ends with one of the first two windows after the switch (an adult window
    before it may by chance be drifted too: the test's false-alarm rate is about p per window,
    which the steady-stream test measures)."""
    indexes = [w.index for w in event.windows]
    assert indexes[-1] in (switch, switch + 1), indexes
    assert len(indexes) == 2 and indexes == list(range(indexes[0], indexes[0] + 2))
    assert all(w.drift for w in event.windows)
    assert event.idempotency_key == f"{ref_id}:{kind}:{indexes[0]}"


def feed(monitor, traffic: Traffic, *segments: list[str]) -> None:
    """Sends each segment once the monitor has taken the previous one: records spread over the
    topic's partitions arrive in partition order, not send order, and a segment boundary must
    be a window boundary."""
    for segment in segments:
        seen = status(monitor).questions_seen
        traffic.send(segment)
        wait_seen(monitor, seen + len(segment))


def restart_with_reference(monitor, questions: list[str], description: str) -> str:
    info = monitor.SetReference(
        monitor_pb2.SetReferenceRequest(
            texts=monitor_pb2.Texts(texts=questions),
            description=description,
            restart_windows=True,
        ),
        timeout=60,
    )
    assert info.size == len(questions) and info.source == "texts" and info.dimension == 384
    return info.id


def windows_from(monitor, first: int) -> list[events_pb2.DriftWindow]:
    return [w for w in status(monitor, 100).windows if w.index >= first]


def test_monitor_has_health_and_reflection(stack):
    with sync_channel(stack.settings.address(stack.settings.monitor_port)) as chan:
        reply = health_pb2_grpc.HealthStub(chan).Check(
            health_pb2.HealthCheckRequest(service="knowstream.monitor.v1.MonitorService"),
            timeout=5,
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_answers_from_the_infer_service_reach_the_monitor(stack, monitor, corpus):
    infer = stub(stack, infer_pb2_grpc.InferServiceStub, stack.settings.infer_port)
    before = status(monitor).questions_seen
    question = next(iter(corpus.values()))["QUESTION"]
    infer.Ask(
        infer_pb2.AskRequest(question=question, candidates=["yes", "no", "maybe"]), timeout=120
    )
    wait_seen(monitor, before + 1)


def test_a_steady_stream_raises_no_event_over_ten_windows(monitor, traffic, corpus):
    pmids = list(corpus)
    random.Random(1).shuffle(pmids)
    reference, stream = pmids[:180], pmids[180:]
    assert len(stream) == 10 * WINDOW
    ref_id = restart_with_reference(
        monitor, [corpus[p]["QUESTION"] for p in reference], "180 random items"
    )
    first, seen, before = next_window(monitor), status(monitor).questions_seen, len(events(monitor))
    # Answer-side signals that arrive meanwhile: shadow pairs and feedback.
    s = traffic.settings
    for i, agreement in enumerate([1.0, 1.0, 0.0]):
        pair = events_pb2.ShadowPairEvent(
            header=new_header("test"), request_id=f"pair-{uuid.uuid4().hex}", agreement=agreement
        )
        traffic.send_raw(s.topic_shadow, pair.SerializeToString(), f"pair-{i}")
    for i, rating in enumerate([-1, 1, 1, -1]):
        feedback = events_pb2.FeedbackEvent(
            header=new_header("test"), request_id="r", rating=rating
        )
        traffic.send_raw(s.topic_feedback, feedback.SerializeToString(), f"feedback-{i}")
    traffic.send(stream)
    wait_seen(monitor, seen + len(stream))
    done = wait_for(lambda: len(w := windows_from(monitor, first)) >= 10 and w, 30, "10 windows")
    assert sum(w.shadow_pairs for w in done) == 3 and sum(w.feedback_count for w in done) == 4
    agreement = sum(w.shadow_agreement * w.shadow_pairs for w in done if w.shadow_pairs)
    negative = sum(w.negative_feedback_share * w.feedback_count for w in done if w.feedback_count)
    assert agreement == pytest.approx(2.0) and negative == pytest.approx(2.0)
    assert [w.index for w in done] == list(range(first, first + 10))
    assert all(w.reference_id == ref_id and w.size == WINDOW for w in done)
    assert len(events(monitor)) == before, "no event on a stream like the reference"
    st = status(monitor)
    assert st.pending == 0 and st.streak <= 1
    # Every window is also an event on the windows topic.
    last = read_events(
        traffic.settings,
        traffic.settings.topic_drift_windows,
        events_pb2.DriftWindow,
        lambda w: w.reference_id == ref_id and w.index == first + 9,
    )
    assert last.p_value == pytest.approx(done[-1].p_value)


def test_questions_without_documents_raise_a_knowledge_gap(
    monitor, traffic, ingest, retrieve, groups, corpus
):
    adult, child = groups
    for pmid in child:
        ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(id=pmid), timeout=10)
    wait_for(
        lambda: not any(searchable(retrieve, p, corpus[p]["QUESTION"]) for p in child),
        60,
        "the paediatric abstracts to leave the index",
    )
    ref_id = restart_with_reference(
        monitor, [corpus[p]["QUESTION"] for p in adult[:100]], "adult-only items"
    )
    first, before = next_window(monitor), len(events(monitor))
    switch = child + child[:3]  # 64 paediatric questions: two windows
    feed(monitor, traffic, adult[100:164], switch)
    new = wait_for(lambda: events(monitor)[: len(events(monitor)) - before], 30, "a drift event")
    assert len(new) == 1
    (event,) = new
    assert event.WhichOneof("kind") == "knowledge_gap"
    gap = event.knowledge_gap
    assert_within_two_windows(gap, first + 2, ref_id, "knowledge_gap")
    assert gap.poorly_retrieved_share >= 0.5
    child_questions = {corpus[p]["QUESTION"] for p in child}
    assert gap.example_questions and set(gap.example_questions) <= child_questions
    on_topic = read_events(
        traffic.settings,
        traffic.settings.topic_knowledge_gaps,
        events_pb2.KnowledgeGap,
        lambda g: g.idempotency_key == gap.idempotency_key,
    )
    assert on_topic.reason == gap.reason and "ingest" in gap.reason
    # The gap is tracked against documents ingested from now on.
    tracked = status(monitor).gaps[0]
    assert tracked.idempotency_key == gap.idempotency_key and tracked.closed_ms == 0
    assert set(tracked.questions) <= child_questions and tracked.covered_share < 0.5


def test_a_mesh_group_switch_requests_retraining_then_cools_down(
    monitor, traffic, ingest, retrieve, groups, corpus, tmp_path
):
    adult, child = groups
    docs = [pubmedqa_document(p, corpus[p]) for p in child]
    reply = ingest.IngestDocuments(ingest_pb2.IngestDocumentsRequest(documents=docs), timeout=120)
    assert reply.accepted == len(child), reply
    wait_for(
        lambda: all(searchable(retrieve, p, corpus[p]["QUESTION"]) for p in child),
        120,
        "the paediatric abstracts to be back",
    )
    # Ingesting the missing abstracts closed the knowledge gap raised before.
    closed = wait_for(
        lambda: [g for g in status(monitor).gaps if g.closed_ms], 60, "the knowledge gap to close"
    )
    assert closed[0].covered_share >= 0.5
    # ...and asked the trainer to learn the documents that closed it.
    learn = read_events(
        traffic.settings,
        traffic.settings.topic_retrain,
        events_pb2.RetrainRequested,
        lambda r: r.idempotency_key == f"{closed[0].idempotency_key}:closed",
    )
    assert "closed by newly ingested documents" in learn.reason
    assert learn.example_questions
    ref_id = restart_with_reference(
        monitor, [corpus[p]["QUESTION"] for p in adult[:100]], "adult-only items"
    )
    first, before = next_window(monitor), len(events(monitor))
    reshuffled = child[:]
    random.Random(2).shuffle(reshuffled)
    # Two adult windows, the switch, two paediatric windows, two more during the cooldown.
    feed(monitor, traffic, adult[100:164], child + child[:3], reshuffled + reshuffled[:3])
    wait_for(lambda: len(windows_from(monitor, first)) >= 6, 30, "6 windows")
    new = events(monitor)[: len(events(monitor)) - before]
    assert len(new) == 1, [e.WhichOneof("kind") for e in new]
    assert new[0].WhichOneof("kind") == "retrain_requested"
    retrain = new[0].retrain_requested
    assert_within_two_windows(retrain, first + 2, ref_id, "retrain")
    assert retrain.poorly_retrieved_share < 0.5 and retrain.live_adapter
    assert retrain.from_ms <= retrain.to_ms and retrain.example_questions
    assert all(w.drift for w in retrain.windows) and retrain.windows[0].drifted_topics
    windows = windows_from(monitor, first)
    # The paediatric windows after the event drifted too, but fall in the cooldown.
    assert sum(w.drift for w in windows[4:6]) >= 1
    assert status(monitor).cooldown_until == retrain.windows[-1].index + 1 + 8
    on_topic = read_events(
        traffic.settings,
        traffic.settings.topic_retrain,
        events_pb2.RetrainRequested,
        lambda r: r.idempotency_key == retrain.idempotency_key,
    )
    assert [w.index for w in on_topic.windows] == [w.index for w in retrain.windows]

    # The CLI shows it: status, events, and the report plot.
    assert cli_main(["drift", "events", "--json"]) == 0
    assert cli_main(["drift", "status", "--json"]) == 0
    png = tmp_path / "drift.png"
    assert cli_main(["drift", "report", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_malformed_events_go_to_the_dead_letter_topics(monitor, traffic, corpus):
    s = traffic.settings
    before = status(monitor)
    good = traffic.event(next(iter(corpus.values()))["QUESTION"])
    not_finite = events_pb2.InferenceEvent()
    not_finite.CopyFrom(good)
    not_finite.query_embedding[3] = float("inf")
    short = events_pb2.InferenceEvent()
    short.CopyFrom(good)
    del short.query_embedding[100:]
    other_model = events_pb2.InferenceEvent()
    other_model.CopyFrom(good)
    other_model.embedding_model = "bge-m3"
    bad = {
        "garbage": b"\x00not a protobuf\xff",
        "not-finite": not_finite.SerializeToString(),
        "short": short.SerializeToString(),
        "other-model": other_model.SerializeToString(),
    }
    tag = uuid.uuid4().hex[:8]
    for name, value in bad.items():
        traffic.send_raw(s.topic_inference, value, f"{tag}-{name}")
    feedback = events_pb2.FeedbackEvent(header=new_header("test"), request_id="r", rating=7)
    traffic.send_raw(s.topic_feedback, feedback.SerializeToString(), f"{tag}-rating")
    # The same good event twice (a redelivery) counts once.
    traffic.send_event(good)
    traffic.send_event(good)
    traffic.producer.flush()

    reasons = {}
    for name in bad:
        letter = read_events(
            s,
            s.dlq(s.topic_inference),
            events_pb2.DeadLetter,
            lambda d, key=f"{tag}-{name}": d.key == key.encode(),
        )
        assert letter.consumer == "monitor" and letter.source_topic == s.topic_inference
        reasons[name] = letter.reason
    assert "InferenceEvent" in reasons["garbage"]
    assert "non-finite" in reasons["not-finite"]
    assert "100 dimensions" in reasons["short"]
    assert "bge-m3" in reasons["other-model"]
    letter = read_events(
        s,
        s.dlq(s.topic_feedback),
        events_pb2.DeadLetter,
        lambda d: d.key == f"{tag}-rating".encode(),
    )
    assert "rating 7" in letter.reason
    after = wait_seen(monitor, before.questions_seen + 1)
    wait_for(
        lambda: status(monitor).dead_letters >= before.dead_letters + 5, 30, "dead-letter count"
    )
    assert after.questions_seen == before.questions_seen + 1


def test_reference_sources_and_bad_requests(monitor, traffic, corpus):
    # The last questions seen, and a time range of them (the log's ids are arrival times).
    recent = monitor.SetReference(monitor_pb2.SetReferenceRequest(recent=64), timeout=60)
    assert recent.source == "recent" and recent.size == 64
    now = int(time.time() * 1000)
    ranged = monitor.SetReference(
        monitor_pb2.SetReferenceRequest(
            time_range=monitor_pb2.TimeRange(from_ms=now - 3_600_000), description="last hour"
        ),
        timeout=60,
    )
    assert ranged.source == "time_range" and ranged.size >= 64
    assert status(monitor).reference.id == ranged.id

    def code(request) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as failure:
            monitor.SetReference(request, timeout=30)
        return failure.value.code(), failure.value.details()

    assert code(monitor_pb2.SetReferenceRequest())[0] == grpc.StatusCode.INVALID_ARGUMENT
    few = code(monitor_pb2.SetReferenceRequest(texts=monitor_pb2.Texts(texts=["a", "b"])))
    assert few[0] == grpc.StatusCode.INVALID_ARGUMENT and "at least" in few[1]
    future = code(
        monitor_pb2.SetReferenceRequest(time_range=monitor_pb2.TimeRange(from_ms=now + 10**9))
    )
    assert future[0] == grpc.StatusCode.INVALID_ARGUMENT
    untrained = code(monitor_pb2.SetReferenceRequest(adapter="base"))
    assert (
        untrained[0] == grpc.StatusCode.FAILED_PRECONDITION and "training questions" in untrained[1]
    )
    unknown = code(monitor_pb2.SetReferenceRequest(adapter="no-such-adapter"))
    assert unknown[0] == grpc.StatusCode.NOT_FOUND


def test_a_restarted_monitor_resumes_its_windows_and_streak(
    stack, monitor, traffic, groups, corpus
):
    adult, child = groups
    ref_id = restart_with_reference(
        monitor, [corpus[p]["QUESTION"] for p in adult[:100]], "adult-only items"
    )
    first, seen, before = next_window(monitor), status(monitor).questions_seen, len(events(monitor))
    # One paediatric window (drifted: streak 1), and 16 questions pending.
    feed(monitor, traffic, child[:48])
    wait_for(lambda: len(windows_from(monitor, first)) >= 1, 30, "a window")
    s = status(monitor)
    assert s.pending == 16 and s.streak == 1 and len(events(monitor)) == before

    # Killed without a chance to commit its Kafka offsets: records are delivered again.
    stack.stop("monitor", sig=signal.SIGKILL)
    traffic.send(child[48:61] + child[:3])  # completes the third window while it is down
    stack.start_service("monitor")
    stack.wait_serving(["monitor"], timeout_s=120)

    s = wait_seen(monitor, seen + 64)
    windows = wait_for(lambda: len(w := windows_from(monitor, first)) >= 2 and w, 60, "window 2")
    assert [w.index for w in windows] == [first, first + 1]
    assert s.questions_seen == seen + 64, "redelivered records were not counted twice"
    new = events(monitor)[: len(events(monitor)) - before]
    # The streak survived the restart: the drifted windows before and after it make one event.
    assert len(new) == 1 and new[0].WhichOneof("kind") == "retrain_requested"
    assert [w.index for w in new[0].retrain_requested.windows] == [first, first + 1]
    assert new[0].retrain_requested.reference_id == ref_id
    assert status(monitor).pending == 0
    assert status(monitor).reference.id == ref_id
