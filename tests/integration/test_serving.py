"""The serving path through the real Triton server (SmolLM2-135M-Instruct, python backend),
the broker and Redis: answers with citations, streaming, hot swap, shadow, canary, errors.

Over 400 lines because these are one area's integration tests on the session stack, sharing
the module's clients and data; split, each part would repeat the fixtures."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.cli.documents import pubmedqa_document
from services.cli.main import main as cli_main
from services.common.adapter_upload import upload_adapter
from services.common.adapters import create_random_adapter
from services.common.clients import sync_channel
from services.common.models import resolve_llm_dir
from tests.integration.conftest import read_events, wait_for

pytestmark = pytest.mark.integration

YES_NO_MAYBE = ["yes", "no", "maybe"]


@pytest.fixture(scope="module")
def infer(stack):
    return infer_pb2_grpc.InferServiceStub(
        sync_channel(stack.settings.address(stack.settings.infer_port))
    )


@pytest.fixture(scope="module")
def admin(stack):
    return infer_pb2_grpc.AdapterAdminServiceStub(
        sync_channel(stack.settings.address(stack.settings.infer_port))
    )


@pytest.fixture(scope="module")
def adapters(stack, admin, tmp_path_factory) -> list[str]:
    """Two random LoRA adapters for the served model, registered and loaded."""
    model_dir = resolve_llm_dir(stack.settings.llm_model, stack.settings.cache_dir)
    ids = []
    for seed in (11, 12):
        path = create_random_adapter(
            model_dir, tmp_path_factory.mktemp(f"adapter-{seed}"), seed=seed, scale=0.05
        )
        status = upload_adapter(admin, path, load=True, timeout=120)
        assert status.loaded and len(status.id) == 16
        ids.append(status.id)
    return ids


@pytest.fixture(scope="module")
def indexed(stack, pubmedqa) -> list[tuple[str, dict]]:
    """Three PubMedQA items whose abstracts are indexed and found by their question (retrieval
    quality is tested elsewhere; here the question is whether the answer cites them)."""
    items = list(pubmedqa.items())[:12]
    ingest = ingest_pb2_grpc.IngestServiceStub(
        sync_channel(stack.settings.address(stack.settings.ingest_port))
    )
    retrieve = retrieve_pb2_grpc.RetrieveServiceStub(
        sync_channel(stack.settings.address(stack.settings.retrieve_port))
    )
    ingest.IngestDocuments(
        ingest_pb2.IngestDocumentsRequest(documents=[pubmedqa_document(k, v) for k, v in items]),
        timeout=60,
    )

    def searchable() -> bool:
        for pmid, _ in items:
            reply = retrieve.Search(
                retrieve_pb2.SearchRequest(
                    query="study", k=1, filters=retrieve_pb2.SearchFilters(doc_ids=[pmid])
                ),
                timeout=10,
            )
            if not reply.hits:
                return False
        return True

    wait_for(searchable, 180, "the abstracts to be searchable")
    wait_for(
        lambda: (
            retrieve.GetIndexStats(retrieve_pb2.GetIndexStatsRequest(), timeout=10).bm25_lag_chunks
            == 0
        ),
        60,
        "BM25 to catch up (hybrid ranks must be final before choosing the questions)",
    )
    found = []
    for pmid, item in items:
        hits = retrieve.Search(retrieve_pb2.SearchRequest(query=item["QUESTION"], k=3), timeout=10)
        if pmid in {h.doc_id for h in hits.hits}:
            found.append((pmid, item))
    assert len(found) >= 3, f"only {len(found)} of 12 questions retrieve their abstract"
    return found[:3]


def quick(question: str = "Is exercise good for the heart?", **kw) -> infer_pb2.AskRequest:
    """A cheap request: no retrieval, score mode (one forward pass)."""
    return infer_pb2.AskRequest(question=question, no_retrieval=True, candidates=YES_NO_MAYBE, **kw)


def test_infer_has_health_and_triton_is_up(stack):
    with sync_channel(stack.settings.address(stack.settings.infer_port)) as chan:
        for name in ("knowstream.infer.v1.InferService", "knowstream.infer.v1.AdapterAdminService"):
            reply = health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert stack.triton_ready()


def test_answer_cites_the_ingested_abstract(stack, infer, indexed):
    for pmid, item in indexed:
        reply = infer.Ask(
            infer_pb2.AskRequest(question=item["QUESTION"], k=3, max_tokens=24), timeout=120
        )
        assert reply.answer.strip() and reply.completion_tokens > 0
        assert pmid in {c.doc_id for c in reply.citations}, (pmid, reply.citations)
        assert all(c.chunk_id.startswith(c.doc_id + "#") for c in reply.citations)
        assert reply.adapter and reply.route in ("live", "canary")
        assert reply.latency.retrieve_ms > 0 and reply.latency.generate_ms > 0
        assert reply.latency.total_ms >= reply.latency.generate_ms
        assert 0 < reply.confidence <= 1

    event = read_events(
        stack.settings,
        stack.settings.topic_inference,
        events_pb2.InferenceEvent,
        lambda e: e.request_id == reply.request_id,
    )
    assert event.question == indexed[-1][1]["QUESTION"] and event.answer == reply.answer
    assert len(event.query_embedding) == 384 and event.embedding_model
    assert [r.chunk_id for r in event.retrieved] == [c.chunk_id for c in reply.citations]


def test_score_mode_and_cli_json(stack, indexed, capsys):
    pmid, item = indexed[0]
    code = cli_main(["ask", item["QUESTION"], "-k", "2", "--candidates", *YES_NO_MAYBE, "--json"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["answer"] in YES_NO_MAYBE
    assert {"doc_id", "chunk_id"} == set(last["citations"][0])
    assert pmid in {c["doc_id"] for c in last["citations"]}
    assert set(last["latency_ms"]) >= {"retrieve", "prompt", "generate"}
    assert last["adapter"] and 0 < last["confidence"] <= 1


def test_eval_pubmedqa_cli_and_the_monitor_ignores_it(stack, infer, pubmedqa, tmp_path, capsys):
    from knowstream.monitor.v1 import monitor_pb2, monitor_pb2_grpc

    monitor = monitor_pb2_grpc.MonitorServiceStub(
        sync_channel(stack.settings.address(stack.settings.monitor_port))
    )

    def seen() -> int:
        request = monitor_pb2.GetDriftStatusRequest(windows=1)
        return monitor.GetDriftStatus(request, timeout=10).questions_seen

    def settled() -> bool:  # answers of earlier tests may still be on their way to it
        count = seen()
        time.sleep(2)
        return seen() == count

    wait_for(settled, 60, "the monitor to take the earlier answers")
    before = seen()
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(dict(list(pubmedqa.items())[40:46])), encoding="utf-8")
    assert cli_main(["eval", "pubmedqa", "--data", str(subset), "--adapter", "base", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 6 and 0 <= result["accuracy"] <= 1 and result["retrieval"]
    assert set(result["per_label"]) == {"yes", "no", "maybe"} and 0 <= result["macro_f1"] <= 1
    assert result["retrieval_recall@5"] >= 0.8  # each question's own abstract, ingested first
    assert sum(result["predicted"].values()) == 6
    code = cli_main(["eval", "pubmedqa", "--data", str(subset), "--no-retrieval", "--json"])
    assert code == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["retrieval_recall@5"] is None and plain["n"] == 6
    # Evaluation traffic is not user traffic: the monitor leaves it out. One user question
    # after it is counted.
    infer.Ask(
        infer_pb2.AskRequest(
            question=pubmedqa[next(iter(pubmedqa))]["QUESTION"], candidates=YES_NO_MAYBE
        ),
        timeout=60,
    )
    wait_for(lambda: seen() >= before + 1, 30, "the user question to reach the monitor")
    time.sleep(2)
    assert seen() == before + 1
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"1": {"QUESTION": "q?", "final_decision": "perhaps"}}), encoding="utf-8"
    )
    assert cli_main(["eval", "pubmedqa", "--data", str(bad), "--json"]) == 2
    assert "perhaps" in capsys.readouterr().err


def test_stream_sends_the_answer_piece_by_piece(infer):
    request = infer_pb2.AskRequest(
        question="Name three symptoms of the flu.",
        no_retrieval=True,
        max_tokens=24,
        ignore_eos=True,
    )
    chunks = list(infer.AskStream(request, timeout=120))
    pieces = [c.text for c in chunks if c.WhichOneof("kind") == "text"]
    final = chunks[-1].final
    assert chunks[-1].WhichOneof("kind") == "final" and len(pieces) > 3
    assert "".join(pieces) == final.answer and final.completion_tokens == 24


def test_live_flips_under_load_without_failed_requests(admin, infer, adapters):
    a, b = adapters
    admin.Promote(infer_pb2.PromoteRequest(adapter=a), timeout=60)
    stop = threading.Event()
    served: list[tuple[float, float, str]] = []
    failures: list[str] = []

    def client(n: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = infer.Ask(quick(f"Question {n}: is water wet?"), timeout=60)
                served.append((started, time.monotonic(), reply.adapter))
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    flips: list[tuple[float, float, str]] = []

    def served_after(t: float) -> None:
        # Until a request started after the flip has been answered (a fixed pause was too short
        # when other work shares the CPU: no request started after the last flip).
        wait_for(lambda: any(started > t for started, _, _ in served), 60, "a request")

    try:
        time.sleep(2)
        for target in (b, a, b):
            called = time.monotonic()
            state = admin.Promote(infer_pb2.PromoteRequest(adapter=target), timeout=60)
            flips.append((called, time.monotonic(), target))
            assert state.live == target
            served_after(flips[-1][1])
        called = time.monotonic()
        state = admin.Rollback(infer_pb2.RollbackRequest(reason="test"), timeout=60)
        flips.append((called, time.monotonic(), a))
        assert state.live == a and state.history[0] == b
        served_after(flips[-1][1])
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures
    checked = 0
    for i, (_, returned, target) in enumerate(flips):
        next_call = flips[i + 1][0] if i + 1 < len(flips) else float("inf")
        after = [adapter for started, _, adapter in served if returned < started < next_call]
        assert after and all(adapter == target for adapter in after), (i, target, after)
        checked += len(after)
    assert checked >= 8


def test_shadow_mirrors_and_records_pairs(stack, admin, infer, adapters):
    a, b = adapters
    admin.Promote(infer_pb2.PromoteRequest(adapter=a), timeout=60)
    state = admin.SetRollout(
        infer_pb2.SetRolloutRequest(adapter=b, mode="shadow", share=1.0), timeout=60
    )
    assert state.candidate == b and state.mode == "shadow"
    try:
        reply = infer.Ask(quick("Does smoking cause lung cancer?"), timeout=60)
        assert reply.adapter == a and reply.route == "live"
        pair = read_events(
            stack.settings,
            stack.settings.topic_shadow,
            events_pb2.ShadowPairEvent,
            lambda e: e.request_id == reply.request_id,
        )
        assert pair.live_adapter == a and pair.shadow_adapter == b and not pair.shadow_error
        assert pair.live_answer == reply.answer and pair.shadow_answer in YES_NO_MAYBE
        assert pair.agreement in (0.0, 1.0)
        event = read_events(
            stack.settings,
            stack.settings.topic_inference,
            events_pb2.InferenceEvent,
            lambda e: e.request_id == reply.request_id,
        )
        assert event.mirrored and event.adapter == a
        shadow_alias = infer.Ask(quick(adapter="shadow"), timeout=60)
        assert shadow_alias.adapter == b and shadow_alias.route == "explicit"
    finally:
        admin.SetRollout(infer_pb2.SetRolloutRequest(mode="off"), timeout=60)


def test_canary_serves_a_sticky_share_of_callers(admin, infer, adapters):
    a, b = adapters
    admin.Promote(infer_pb2.PromoteRequest(adapter=a), timeout=60)
    admin.SetRollout(infer_pb2.SetRolloutRequest(adapter=b, mode="canary", share=0.5), timeout=60)
    try:
        first = {c: infer.Ask(quick(caller=f"user-{c}"), timeout=60) for c in range(12)}
        for c in range(12):
            again = infer.Ask(quick(caller=f"user-{c}"), timeout=60)
            assert again.adapter == first[c].adapter
        routes = {r.route for r in first.values()}
        assert routes == {"live", "canary"}
        assert all((r.adapter == b) == (r.route == "canary") for r in first.values())
    finally:
        admin.SetRollout(infer_pb2.SetRolloutRequest(mode="off"), timeout=60)


def test_adapter_admin_lists_and_shows(stack, admin, infer, adapters):
    listed = admin.ListAdapters(infer_pb2.ListAdaptersRequest(), timeout=30)
    by_id = {a.id: a for a in listed.adapters}
    assert set(adapters) <= set(by_id) and all(by_id[a].loaded for a in adapters)
    live = admin.GetAdapter(infer_pb2.GetAdapterRequest(adapter="live"), timeout=30)
    assert "live" in live.aliases and live.rank == 8
    with pytest.raises(grpc.RpcError) as err:
        admin.GetAdapter(infer_pb2.GetAdapterRequest(adapter="feedfacefeedface"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.RegisterAdapter(infer_pb2.RegisterAdapterRequest(path="/nonexistent"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_feedback_is_published(stack, infer):
    answer = infer.Ask(quick(), timeout=60)
    ack = infer.SubmitFeedback(
        infer_pb2.FeedbackRequest(request_id=answer.request_id, rating=-1, correction="no"),
        timeout=30,
    )
    event = read_events(
        stack.settings,
        stack.settings.topic_feedback,
        events_pb2.FeedbackEvent,
        lambda e: e.header.event_id == ack.event_id,
    )
    assert event.request_id == answer.request_id and event.rating == -1
    assert event.correction == "no"


@pytest.mark.parametrize(
    "request_kw, code, message",
    [
        ({"question": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "question is empty"),
        ({"question": "q", "adapter": "0123456789abcdef"}, grpc.StatusCode.NOT_FOUND, "unknown"),
        ({"question": "q", "max_tokens": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        ({"question": "q", "k": 99}, grpc.StatusCode.INVALID_ARGUMENT, "k=99"),
        ({"question": "q", "temperature": 9}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        # A cap (issue 13): the message names the field, the limit and the setting.
        (
            {"question": "q", "stop": ["s"] * 9},
            grpc.StatusCode.INVALID_ARGUMENT,
            "stop has 9 entries; the limit is 8 (KS_LIMIT_STOP_STRINGS)",
        ),
    ],
)
def test_bad_requests_get_clear_errors(infer, request_kw, code, message):
    with pytest.raises(grpc.RpcError) as err:
        infer.Ask(infer_pb2.AskRequest(**request_kw), timeout=10)
    assert err.value.code() == code and message in err.value.details()


def test_rollout_errors(admin):
    with pytest.raises(grpc.RpcError) as err:
        admin.SetRollout(infer_pb2.SetRolloutRequest(adapter="live", mode="bogus"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        admin.SetRollout(infer_pb2.SetRolloutRequest(adapter="nope", mode="shadow"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_burst_beyond_the_models_room_is_shed_and_the_rest_answered(infer):
    # 40 at once, against a batch of 8 and 2 more held (KS_ENGINE_MAX_WAITING): the excess is
    # refused with RESOURCE_EXHAUSTED, never queued behind the admitted ones. On a busy machine
    # Triton's own queue (16, the second line) may refuse some before execute() takes them;
    # the model still sees more than it may hold, so its own limit refuses some too.
    request = infer_pb2.AskRequest(
        question="Is aspirin an analgesic?", no_retrieval=True, max_tokens=24, ignore_eos=True
    )
    calls = [infer.Ask.future(request, timeout=120) for _ in range(40)]
    answered, shed = 0, []
    for call in calls:
        try:
            assert call.result().completion_tokens == 24
            answered += 1
        except grpc.RpcError as err:
            shed.append((err.code(), err.details()))
    assert 8 <= answered < 40 and shed, (answered, shed[:3])
    for code, details in shed:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "overloaded, retry later" in details, details
    assert any("admission limit" in details for _, details in shed), shed[:3]
    assert infer.Ask(quick(), timeout=60).answer in YES_NO_MAYBE  # and it serves again


def test_triton_down_gives_unavailable_within_the_deadline(stack, infer):
    stack.stop("triton")
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            infer.Ask(quick(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "Triton" in err.value.details() and time.monotonic() - started < 10
        wait_for(lambda: stack.health("infer") == "NOT_SERVING", 30, "infer to report NOT_SERVING")
    finally:
        stack.start_triton()
        stack.wait_serving(["infer"], 120)
    assert infer.Ask(quick(), timeout=60).answer in YES_NO_MAYBE


def test_retrieval_down_gives_unavailable_and_a_short_deadline_is_kept(stack, infer):
    stack.stop("retrieve")
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            infer.Ask(infer_pb2.AskRequest(question="Is aspirin safe?"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "retrieve service unavailable" in err.value.details()
        assert time.monotonic() - started < 10
    finally:
        stack.start_service("retrieve")
        stack.wait_serving(["retrieve"], 180)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        infer.Ask(
            infer_pb2.AskRequest(
                question="Describe the heart.", no_retrieval=True, max_tokens=400, ignore_eos=True
            ),
            timeout=1.5,
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


def test_adapter_files_are_content_addressed(stack, adapters):
    for adapter_id in adapters:
        stored = Path(stack.env["KS_ADAPTER_DIR"]) / adapter_id
        assert (stored / "adapter_model.safetensors").is_file()
        assert (stored / "adapter_config.json").is_file()
