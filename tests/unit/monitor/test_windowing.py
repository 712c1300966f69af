"""The monitor's logic without a network: event validation, window records with answer-side
signals, decisions as events, references, and the report plot."""

from __future__ import annotations

import numpy as np
import pytest

from knowstream.events.v1 import events_pb2
from knowstream.monitor.v1 import monitor_pb2
from services.common import tracing
from services.common.kafka import BadEvent, new_header
from services.monitor.policy import DriftPolicy
from services.monitor.report import plot
from services.monitor.settings import MonitorSettings
from services.monitor.windowing import (
    build_reference,
    compute_window,
    cover_gap,
    decision_event,
    gap_covered_share,
    new_gap,
    parse_inference,
    policy_config,
)

MODEL = "all-MiniLM-L6-v2"


def settings(**kw) -> MonitorSettings:
    return MonitorSettings(**kw)


def unit(rng, n: int, d: int = 16, shift: float = 0.0) -> np.ndarray:
    x = rng.normal(size=(n, d))
    x[:, 0] += shift
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def inference(**kw) -> events_pb2.InferenceEvent:
    fields = dict(
        header=new_header("infer"),
        request_id="r1",
        question="Does aspirin help?",
        query_embedding=[0.5, 0.5, 0.5, 0.5],
        embedding_model=MODEL,
    )
    fields.update(kw)
    return events_pb2.InferenceEvent(**fields)


def test_inference_events_are_validated_with_reasons():
    ok = parse_inference(inference().SerializeToString(), MODEL, 4)
    assert ok.question == "Does aspirin help?"
    cases = {
        b"": "empty record",
        b"\xff\x00junk": "not a InferenceEvent",
        inference(header=None).SerializeToString(): "without a header",
        inference(question=" ").SerializeToString(): "without a question",
        inference(embedding_model="bge-m3").SerializeToString(): "'bge-m3'",
        inference(query_embedding=[1.0, 2.0]).SerializeToString(): "2 dimensions",
        inference(query_embedding=[1.0, float("nan"), 0, 0]).SerializeToString(): "non-finite",
    }
    for value, reason in cases.items():
        with pytest.raises(BadEvent, match=reason.replace("(", r"\(")):
            parse_inference(value, MODEL, 4)
    assert parse_inference(inference(query_embedding=[]).SerializeToString(), MODEL, 4) is None
    future = inference()
    future.header.schema_version = 9
    with pytest.raises(BadEvent, match="schema_version 9"):
        parse_inference(future.SerializeToString(), MODEL, 4)


def test_a_window_record_carries_statistics_and_answer_side_signals():
    rng = np.random.default_rng(0)
    s = settings(monitor_window=20)
    ref_id, ref = build_reference(unit(rng, 120), [f"does drug {i} help" for i in range(120)], s)
    assert ref_id.startswith("ref-") and len(ref.centroids) == 8
    scores = [0.2] * 5 + [0.8] * 15
    confidences = [0.3] * 4 + [0.9] * 16
    window, result = compute_window(
        ref,
        ref_id,
        7,
        [f"is surgery safe in children {i}" for i in range(20)],
        unit(rng, 20, shift=3.0),
        scores,
        confidences,
        list(range(1000, 1020)),
        {"shadow_pairs": 4, "shadow_agreement": 3.0, "feedback": 5, "feedback_negative": 2},
        s,
    )
    assert window.index == 7 and window.size == 20 and window.reference_id == ref_id
    assert window.drift and window.triggered_by == ["p_value"] and window.p_value < 0.01
    assert (window.start_ms, window.end_ms) == (1000, 1019)
    assert window.poorly_retrieved_share == pytest.approx(0.25)
    assert window.low_confidence_share == pytest.approx(0.2)
    assert window.mean_top_score == pytest.approx(0.65)
    assert window.shadow_agreement == pytest.approx(0.75) and window.shadow_pairs == 4
    assert window.negative_feedback_share == pytest.approx(0.4)
    assert window.drifted_topics and "surgery" in window.drifted_topics[0].terms
    assert result.drift and result.top_scores == scores
    # Without answer-side data the shares are 0 and the absent signals -1.
    again, _ = compute_window(
        ref,
        ref_id,
        7,
        [f"is surgery safe in children {i}" for i in range(20)],
        unit(rng, 20),
        [None] * 20,
        [None] * 20,
        list(range(20)),
        {},
        s,
    )
    assert again.shadow_agreement == -1 and again.negative_feedback_share == -1
    assert again.low_confidence_share == 0 and again.mean_top_score == 0


def test_same_window_same_p_value():
    rng = np.random.default_rng(3)
    s = settings()
    ref_id, ref = build_reference(unit(rng, 100), [f"q {i}" for i in range(100)], s)
    x = unit(rng, 32, shift=0.3)
    args = (["q"] * 32, x, [None] * 32, [None] * 32, list(range(32)), {}, s)
    first, _ = compute_window(ref, ref_id, 4, *args)
    second, _ = compute_window(ref, ref_id, 4, *args)
    assert first.p_value == second.p_value and first.mmd2 == second.mmd2


def test_decisions_become_retrain_or_gap_events_with_evidence():
    rng = np.random.default_rng(1)
    s = settings()
    ref_id, ref = build_reference(unit(rng, 100), [f"adult {i}" for i in range(100)], s)
    for score, kind in ((0.8, "retrain_requested"), (0.2, "knowledge_gap")):
        policy = DriftPolicy(policy_config(s), ref_id)
        decision = None
        for index in range(2):
            _, result = compute_window(
                ref,
                ref_id,
                index,
                [f"child question {index} {i}" for i in range(32)],
                unit(rng, 32, shift=3.0),
                [score] * 32,
                [None] * 32,
                list(range(index * 32, index * 32 + 32)),
                {},
                s,
            )
            decision = policy.observe(result)
        assert decision is not None
        event = decision_event(decision, ref_id, "adapter-1", s)
        assert event.WhichOneof("kind") == kind
        inner = getattr(event, kind)
        assert [w.index for w in inner.windows] == [0, 1] and inner.windows[1].drift
        assert inner.idempotency_key == decision.idempotency_key
        assert tracing.valid_trace_id(inner.header.trace_id)  # a decision starts a trace
        assert (inner.from_ms, inner.to_ms) == (0, 63)
        assert inner.example_questions[0] == "child question 0 0"
        if kind == "retrain_requested":
            assert inner.live_adapter == "adapter-1" and "adapt" in inner.reason
        else:
            assert inner.gap_score == pytest.approx(0.5) and "ingest" in inner.reason


def test_references_are_sampled_and_identified_by_content():
    rng = np.random.default_rng(2)
    s = settings(monitor_reference_max=50)
    x = unit(rng, 200)
    texts = [f"q{i}" for i in range(200)]
    ref_id, ref = build_reference(x, texts, s)
    assert len(ref.texts) == 50 and ref.texts[0] == "q0" and ref.texts[-1] == "q199"
    assert build_reference(x, texts, s)[0] == ref_id
    assert build_reference(x[::-1].copy(), texts[::-1], s)[0] != ref_id
    with pytest.raises(ValueError, match="at least 8"):
        build_reference(x[:5], texts[:5], s)


def test_the_report_is_a_png(tmp_path):
    rng = np.random.default_rng(4)
    s = settings()
    ref_id, ref = build_reference(unit(rng, 100), [f"q {i}" for i in range(100)], s)
    windows = []
    policy = DriftPolicy(policy_config(s), ref_id)
    events = []
    for index in range(6):
        window, result = compute_window(
            ref,
            ref_id,
            index,
            ["q"] * 32,
            unit(rng, 32, shift=3.0 if index >= 3 else 0.0),
            [0.9] * 32,
            [0.8] * 32,
            list(range(32)),
            {},
            s,
        )
        windows.append(window)
        if (decision := policy.observe(result)) is not None:
            events.append(decision_event(decision, ref_id, "base", s))
    assert len(events) == 1
    out = tmp_path / "report.png"
    plot(windows, events, monitor_pb2.PolicySettings(p_value=0.01, gap_share=0.5), out)
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no windows"):
        plot([], [], monitor_pb2.PolicySettings(), out)


def test_ingested_chunks_close_a_knowledge_gap():
    rng = np.random.default_rng(6)
    questions = unit(rng, 4)
    gap = new_gap("k", ["q1", "q2", "q3", "q4"], questions, [0.2, 0.3, 0.1, 0.6], 1)
    assert gap_covered_share(gap, 0.5) == 0.25
    unrelated = unit(rng, 10)
    unrelated -= questions.mean(0)  # pointing away from the questions
    unrelated /= np.linalg.norm(unrelated, axis=1, keepdims=True)
    cover_gap(gap, unrelated, 0.5, 0.5, 2)
    assert gap["closed_ms"] == 0
    # A chunk that answers q1: 2 of 4 covered, 50% still uncovered, not < 50%: open.
    assert cover_gap(gap, questions[:1], 0.5, 0.5, 3) and gap["closed_ms"] == 0
    assert gap_covered_share(gap, 0.5) == 0.5
    assert cover_gap(gap, questions[1:2], 0.5, 0.5, 4) and gap["closed_ms"] == 4
    assert not cover_gap(gap, questions, 0.5, 0.5, 5), "a closed gap stays closed"


def test_a_gap_without_questions_in_the_last_window_is_reported_not_tracked():
    gap = new_gap("k", [], np.zeros((0, 16), np.float32), [], 1)
    assert gap_covered_share(gap, 0.5) == 0.0
    assert not cover_gap(gap, unit(np.random.default_rng(0), 3), 0.5, 0.5, 2)
    assert gap["closed_ms"] == 0
