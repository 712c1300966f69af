"""Results to responses and events (services/infer/converters.py)."""

from __future__ import annotations

import math

import pytest

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2
from knowstream.retrieve.v1 import retrieve_pb2
from services.infer.converters import ask_response, confidence, inference_event, shadow_pair
from services.infer.routing import Route
from services.llm.prompts import Passage
from services.llm.triton import Generation

SCORED = Generation(text="yes", adapter="a1", candidate_logprobs=[-0.1, -2.0, -3.0])
FREE = Generation(text="It does [1].", completion_tokens=4, mean_logprob=math.log(0.5))


def test_confidence_is_the_chosen_candidates_share_or_the_tokens_mean():
    assert confidence(SCORED, True) == pytest.approx(
        math.exp(-0.1) / sum(math.exp(x) for x in (-0.1, -2.0, -3.0))
    )
    assert confidence(FREE, False) == pytest.approx(0.5)
    assert confidence(Generation(), False) == 0.0 and confidence(Generation(), True) == 0.0


def test_the_response_cites_every_passage_and_marks_the_referenced_ones():
    passages = [Passage("d1", "d1:0", "T1", "x", 0.9), Passage("d2", "d2:0", "", "y", 0.5)]
    latency = events_pb2.LatencyBreakdown(total_ms=12.0)
    reply = ask_response("r1", FREE, Route("live-1", "live"), passages, latency, False)
    assert [(c.number, c.doc_id, c.referenced) for c in reply.citations] == [
        (1, "d1", True),
        (2, "d2", False),
    ]
    assert reply.adapter == "live-1" and reply.route == "live" and reply.latency.total_ms == 12


def test_the_event_carries_the_response_and_what_was_retrieved():
    search = retrieve_pb2.SearchResponse(
        hits=[retrieve_pb2.SearchHit(doc_id="d1", chunk_id="d1:0", score=0.9)],
        query_embedding=[0.1, 0.2],
        embedding_model="m",
    )
    request = infer_pb2.AskRequest(question="q?", candidates=["yes", "no", "maybe"])
    reply = ask_response(
        "r1", SCORED, Route("a1", "explicit"), [], events_pb2.LatencyBreakdown(), True
    )
    event = inference_event(request, reply, "alice", search, mirrored=True)
    assert event.request_id == "r1" and event.caller == "alice" and event.question == "q?"
    assert [r.chunk_id for r in event.retrieved] == ["d1:0"] and event.mirrored
    assert event.confidence == reply.confidence and list(event.candidates) == ["yes", "no", "maybe"]
    assert event.header.event_id  # a versioned event with its own header


def test_a_failed_mirror_is_not_a_disagreement_of_zero_confidence_answers():
    chosen = Route("live-1", "live", mirror="cand")
    ok = shadow_pair("r1", "q?", chosen, SCORED, SCORED, "", True)
    assert ok.agreement == 1.0 and ok.shadow_adapter == "cand" and not ok.shadow_error
    failed = shadow_pair("r1", "q?", chosen, SCORED, Generation(), "TritonUnavailable: x", True)
    assert failed.agreement == 0.0 and failed.shadow_error and failed.shadow_confidence == 0.0
