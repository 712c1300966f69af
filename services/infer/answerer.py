"""Everything Ask does, without gRPC plumbing: validation, routing, retrieval, prompt,
generation through Triton, shadow mirroring and the answer event (responses and events are
built by services/infer/converters.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common.access import narrow
from services.common.adapters import (
    AdapterRegistry,
)
from services.common.auth import caller_scope
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from services.common.metrics import ASK_LATENCY, SHADOW_AGREEMENT
from services.common.publisher import EventPublisher
from services.infer.converters import ask_response, inference_event, shadow_pair
from services.infer.requests import RecentRequests
from services.infer.routing import Route, route
from services.infer.settings import InferSettings
from services.infer.validation import check_ask, check_score
from services.llm.llm import LLMRequest
from services.llm.prompts import Passage, Prompt, build_prompt
from services.llm.triton import (
    Generation,
    TritonLLM,
    TritonRejected,
)

log = logging.getLogger(__name__)

MIRRORS = Counter("ks_shadow_mirrors_total", "Mirrored shadow calls", ["outcome"])


@dataclass
class Answer:
    response: infer_pb2.AskResponse
    event: events_pb2.InferenceEvent


class Answerer:
    """Everything Ask does, without gRPC plumbing: validation, routing, retrieval, prompt,
    generation through Triton, shadow mirroring and events."""

    def __init__(
        self,
        settings: InferSettings,
        registry: AdapterRegistry,
        llm: TritonLLM,
        retrieve: retrieve_pb2_grpc.RetrieveServiceStub,
        events: EventPublisher,
        requests: RecentRequests,
    ):
        self.settings = settings
        self.registry = registry
        self.llm = llm
        self.retrieve = retrieve
        self.events = events
        self.requests = requests
        self.shadow_inflight = 0
        self._background: set[asyncio.Task[Any]] = set()

    def validate(self, request: infer_pb2.AskRequest) -> None:
        check_ask(request, self.settings)  # InvalidArgument names the field and its cap

    async def choose(self, request: infer_pb2.AskRequest, caller: str) -> Route:
        rollout = await self.registry.rollout()
        if request.adapter.strip():
            adapter = await self.registry.resolve(request.adapter, rollout)  # or NotFound
            return Route(adapter, "explicit")
        return route(rollout, caller)

    async def search(
        self, request: infer_pb2.AskRequest, timeout_s: float
    ) -> retrieve_pb2.SearchResponse:
        k = request.k or self.settings.infer_default_k
        if request.no_retrieval or k == 0:
            return retrieve_pb2.SearchResponse()
        try:
            return await self.retrieve.Search(
                retrieve_pb2.SearchRequest(
                    query=request.question,
                    k=k,
                    filters=caller_filters(request.filters),
                    include_query_embedding=True,
                ),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded("retrieval did not answer within the deadline") from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"retrieval: {exc.details()}") from exc
            raise Unavailable(
                f"retrieve service unavailable ({exc.code().name}): {exc.details()}"
            ) from exc

    async def answer(
        self,
        request: infer_pb2.AskRequest,
        caller: str,
        deadline_s: float | None,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> Answer:
        start = time.perf_counter()
        remaining = self._deadline(deadline_s, start)
        self.validate(request)
        request_id = uuid.uuid4().hex
        chosen = await self.choose(request, caller)
        t = time.perf_counter()
        search = await self.search(request, remaining())
        retrieve_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        prompt, llm_request = self._llm_request(request, search, chosen.adapter)
        prompt_ms = (time.perf_counter() - t) * 1000
        generation = await self._generate(llm_request, remaining(), on_text)
        mirrored = self._mirror(request_id, request, llm_request, chosen, generation)
        latency = events_pb2.LatencyBreakdown(
            retrieve_ms=retrieve_ms,
            prompt_ms=prompt_ms,
            generate_ms=generation.latency_ms,
            compute_ms=generation.compute_ms,
            total_ms=(time.perf_counter() - start) * 1000,
        )
        response = ask_response(
            request_id, generation, chosen, prompt.passages, latency, bool(llm_request.candidates)
        )
        event = inference_event(request, response, caller, search, mirrored)
        ASK_LATENCY.labels(event.adapter or "base", event.route).observe(latency.total_ms / 1000)
        self.events.publish(self.settings.topic_inference, request_id, event)
        self._spawn(self.requests.remember(request_id, request.question))
        return Answer(response, event)

    def _deadline(self, deadline_s: float | None, start: float) -> Callable[[], float]:
        """What is left of the call's budget (the caller's deadline, at most the default), a
        little kept back for the answer; raises DeadlineExceeded once it is spent."""
        budget = min(
            deadline_s or self.settings.infer_default_deadline_s,
            self.settings.infer_default_deadline_s,
        )

        def remaining() -> float:
            left = budget - (time.perf_counter() - start) - 0.02
            if left <= 0:
                raise DeadlineExceeded("deadline passed")
            return left

        return remaining

    def _llm_request(
        self, request: infer_pb2.AskRequest, search: retrieve_pb2.SearchResponse, adapter: str
    ) -> tuple[Prompt, LLMRequest]:
        passages = [Passage(h.doc_id, h.chunk_id, h.title, h.text, h.score) for h in search.hits]
        candidates = list(request.candidates)
        prompt = build_prompt(
            request.question,
            passages,
            request.template or self.settings.infer_template,
            self.settings.infer_max_context_chars,
            candidates,
        )
        return prompt, LLMRequest(
            prompt=prompt.user,
            system=prompt.system,
            adapter=adapter,
            max_new_tokens=request.max_tokens or self.settings.infer_default_max_tokens,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            stop=list(request.stop),
            candidates=candidates,
            ignore_eos=request.ignore_eos,
        )

    def _mirror(
        self,
        request_id: str,
        request: infer_pb2.AskRequest,
        llm_request: LLMRequest,
        chosen: Route,
        generation: Generation,
    ) -> bool:
        """Sends the request to the shadow adapter in the background, when the rollout asks for
        it and fewer than KS_INFER_MAX_SHADOW_INFLIGHT mirrors are running."""
        if not chosen.mirror or self.settings.infer_max_shadow_inflight <= 0:
            return False
        if self.shadow_inflight >= self.settings.infer_max_shadow_inflight:
            MIRRORS.labels("skipped_busy").inc()
            return False
        self._spawn(self._shadow(request_id, request.question, llm_request, chosen, generation))
        return True

    async def _generate(
        self,
        llm_request: LLMRequest,
        timeout_s: float,
        on_text: Callable[[str], Awaitable[None]] | None,
        priority: int = 0,
    ) -> Generation:
        try:
            if on_text is None:
                return await self.llm.generate(llm_request, timeout_s, priority)
            final: Generation | None = None
            async for item in self.llm.stream(llm_request, timeout_s, priority):
                if isinstance(item, Generation):
                    final = item
                else:
                    await on_text(item)
            assert final is not None
            return final
        except TritonRejected as exc:
            raise FailedPrecondition(f"the model refused: {exc}") from exc

    async def score(
        self, request: infer_pb2.ScoreRequest, time_remaining: float | None
    ) -> infer_pb2.ScoreResponse:
        """Score mode on a raw prompt (knowledge probes): no retrieval, no events."""
        check_score(request, self.settings)
        adapter = await self.registry.resolve(request.adapter or "live")
        timeout = time_remaining or self.settings.infer_default_deadline_s
        generation = await self._generate(
            LLMRequest(
                prompt=request.prompt,
                adapter=adapter,
                max_new_tokens=1,
                candidates=list(request.candidates),
                raw_prompt=True,
            ),
            timeout,
            None,
        )
        logprobs = list(generation.candidate_logprobs)
        best = max(range(len(logprobs)), key=logprobs.__getitem__) if logprobs else 0
        return infer_pb2.ScoreResponse(logprobs=logprobs, chosen=best, adapter=adapter)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(
        self,
        request_id: str,
        question: str,
        live_request: LLMRequest,
        chosen: Route,
        live: Generation,
    ) -> None:
        """The mirrored call: same prompt, candidate adapter, lower Triton priority. Its outcome
        only ever becomes an event."""
        assert chosen.mirror is not None
        self.shadow_inflight += 1
        shadow_request = LLMRequest(**{**live_request.__dict__, "adapter": chosen.mirror})
        error = ""
        shadow = Generation()
        try:
            shadow = await self.llm.generate(
                shadow_request,
                self.settings.infer_default_deadline_s,
                priority=self.settings.infer_shadow_priority,
            )
            MIRRORS.labels("ok").inc()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            MIRRORS.labels("failed").inc()
        finally:
            self.shadow_inflight -= 1
        pair = shadow_pair(
            request_id, question, chosen, live, shadow, error, bool(live_request.candidates)
        )
        if not error:  # a failed mirror's 0 is not a disagreement
            SHADOW_AGREEMENT.labels(pair.shadow_adapter).observe(pair.agreement)
        self.events.publish(self.settings.topic_shadow, request_id, pair)

    async def wait_background(self, timeout_s: float) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)


def caller_filters(filters: retrieve_pb2.SearchFilters) -> retrieve_pb2.SearchFilters:
    """The request's filters with the access groups of the caller: this service searches with
    the services' token, which reads every group, so it must say whose search it is. The
    request's own groups can only narrow the caller's."""
    out = retrieve_pb2.SearchFilters()
    out.CopyFrom(filters)
    out.ClearField("access")
    requested = filters.access.groups if filters.HasField("access") else None
    scope = narrow(caller_scope(), requested)
    if scope is not None:
        out.access.SetInParent()  # present even when empty: public documents only
        out.access.groups.extend(sorted(scope))
    return out
