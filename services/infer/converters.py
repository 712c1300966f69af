"""Results to responses and events (as MLServer keeps its converters): what a generation, its
route and its evidence become on the wire. Pure functions: the Answerer calls them, unit tests
call them without a network."""

from __future__ import annotations

import math
from collections.abc import Sequence

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2
from knowstream.retrieve.v1 import retrieve_pb2
from services.common.kafka import new_header
from services.infer.routing import Route
from services.llm.agreement import agreement
from services.llm.llm import softmax
from services.llm.prompts import Passage, referenced_numbers
from services.llm.triton import Generation


def confidence(generation: Generation, scored: bool) -> float:
    """Score mode: the chosen candidate's probability among the candidates; free text: the
    geometric mean of the generated tokens' probabilities (0 when nothing was generated)."""
    if scored:
        logprobs = generation.candidate_logprobs
        return max(softmax(logprobs)) if logprobs else 0.0
    return math.exp(generation.mean_logprob) if generation.completion_tokens else 0.0


def ask_response(
    request_id: str,
    generation: Generation,
    chosen: Route,
    passages: Sequence[Passage],
    latency: events_pb2.LatencyBreakdown,
    scored: bool,
) -> infer_pb2.AskResponse:
    cited = referenced_numbers(generation.text)
    return infer_pb2.AskResponse(
        request_id=request_id,
        answer=generation.text,
        citations=[
            infer_pb2.Citation(
                number=i,
                doc_id=p.doc_id,
                chunk_id=p.chunk_id,
                title=p.title,
                score=p.score,
                referenced=i in cited,
            )
            for i, p in enumerate(passages, start=1)
        ],
        adapter=generation.adapter or chosen.adapter,
        route=chosen.route,
        confidence=confidence(generation, scored),
        latency=latency,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        finish_reason=generation.finish_reason,
        candidate_logprobs=generation.candidate_logprobs,
        batch_size=generation.batch_size,
    )


def inference_event(
    request: infer_pb2.AskRequest,
    response: infer_pb2.AskResponse,
    caller: str,
    search: retrieve_pb2.SearchResponse,
    mirrored: bool,
) -> events_pb2.InferenceEvent:
    """The answer event: the response's figures plus what the drift monitor and the trainer
    need (question, query embedding, what was retrieved, who asked)."""
    return events_pb2.InferenceEvent(
        header=new_header("infer"),
        request_id=response.request_id,
        caller=caller,
        question=request.question,
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
        adapter=response.adapter,
        route=response.route,
        answer=response.answer,
        confidence=response.confidence,
        latency=response.latency,
        prompt_tokens=response.prompt_tokens,
        completion_tokens=response.completion_tokens,
        candidates=list(request.candidates),
        candidate_logprobs=response.candidate_logprobs,
        mirrored=mirrored,
    )


def shadow_pair(
    request_id: str,
    question: str,
    chosen: Route,
    live: Generation,
    shadow: Generation,
    error: str,
    scored: bool,
) -> events_pb2.ShadowPairEvent:
    assert chosen.mirror is not None
    return events_pb2.ShadowPairEvent(
        header=new_header("infer"),
        request_id=request_id,
        question=question,
        live_adapter=live.adapter or chosen.adapter,
        shadow_adapter=chosen.mirror,
        live_answer=live.text,
        shadow_answer=shadow.text,
        # A failed mirror's 0 is not a disagreement: the event says it failed.
        agreement=0.0 if error else agreement(live.text, shadow.text, scored),
        live_confidence=confidence(live, scored),
        shadow_confidence=confidence(shadow, scored),
        live_generate_ms=live.latency_ms,
        shadow_generate_ms=shadow.latency_ms,
        shadow_error=error,
    )
