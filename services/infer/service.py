"""infer service: InferService (Ask, AskStream, SubmitFeedback) and AdapterAdminService.

Answers come from the LLM in Triton; evidence from the retrieve service; adapters, aliases and
the rollout state from the Redis registry. Aliases are resolved here, per request, from one
Redis hash, so a flip reaches the next request as soon as the flip call returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common.adapters import (
    BASE,
    MODES,
    AdapterInfo,
    AdapterRegistry,
    Rollout,
    RolloutError,
    UnknownAdapter,
)
from services.common.clients import channel, is_serving
from services.common.grpcserver import GrpcApp, service_app
from services.common.kafka import make_producer, new_header
from services.common.keys import request_key
from services.common.metrics import EVENTS_PRODUCED
from services.common.net import kafka_alive
from services.common.redisutil import connect, ping, text
from services.infer.llm import LLMRequest, softmax
from services.infer.prompts import TEMPLATES, Passage, build_prompt, referenced_numbers
from services.infer.routing import Route, agreement, route
from services.infer.settings import InferSettings
from services.infer.triton import (
    Generation,
    TritonDeadline,
    TritonLLM,
    TritonRejected,
    TritonUnavailable,
)

log = logging.getLogger(__name__)

MAX_K = 20
MIRRORS = Counter("ks_shadow_mirrors_total", "Mirrored shadow calls", ["outcome"])
EVENTS_DROPPED = Counter("ks_events_dropped_total", "Events dropped (publisher queue full)")


class AskError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class EventPublisher:
    """Publishes events from a background task so that a slow or absent broker never delays or
    fails an answer. The queue is bounded; beyond it events are dropped and counted."""

    def __init__(self, producer: AIOKafkaProducer, service: str, max_queued: int = 10_000):
        self.producer = producer
        self.service = service
        self.queue: asyncio.Queue[tuple[str, bytes, bytes]] = asyncio.Queue(max_queued)

    def publish(self, topic: str, key: str, message: Any) -> None:
        try:
            self.queue.put_nowait((topic, key.encode(), message.SerializeToString()))
        except asyncio.QueueFull:
            EVENTS_DROPPED.inc()
            log.warning("event queue full; dropped an event for %s", topic)

    async def run(self) -> None:
        while True:
            topic, key, value = await self.queue.get()
            while True:
                try:
                    await self.producer.send(topic, value, key=key)
                    EVENTS_PRODUCED.labels(self.service, topic).inc()
                    break
                except Exception as exc:
                    log.warning("publishing to %s failed (%s); retrying", topic, exc)
                    await asyncio.sleep(1)

    async def drain(self, timeout_s: float = 5) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.producer.flush()


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
    ):
        self.settings = settings
        self.registry = registry
        self.llm = llm
        self.retrieve = retrieve
        self.events = events
        self.shadow_inflight = 0
        self._background: set[asyncio.Task[Any]] = set()

    def validate(self, request: infer_pb2.AskRequest) -> None:
        s = self.settings
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not request.question.strip():
            raise AskError(bad, "question is empty")
        if len(request.question) > 4000:
            raise AskError(
                bad, f"question has {len(request.question)} characters; the limit is 4000"
            )
        if request.k > MAX_K:
            raise AskError(bad, f"k={request.k} is above the limit of {MAX_K}")
        if request.max_tokens > s.llm_max_new_tokens:
            raise AskError(
                bad, f"max_tokens={request.max_tokens} is above the limit of {s.llm_max_new_tokens}"
            )
        if not 0 <= request.temperature <= 2 or math.isnan(request.temperature):
            raise AskError(bad, "temperature must be in [0, 2]")
        if not 0 <= request.top_p <= 1 or math.isnan(request.top_p):
            raise AskError(bad, "top_p must be in (0, 1] (0 means 1)")
        if request.template and request.template not in TEMPLATES:
            raise AskError(bad, f"unknown template {request.template!r}; one of {TEMPLATES}")
        if any(not c.strip() for c in request.candidates):
            raise AskError(bad, "empty candidate answer")
        if len(request.candidates) > 16:
            raise AskError(bad, "at most 16 candidates")

    async def choose(self, request: infer_pb2.AskRequest, caller: str) -> Route:
        rollout = await self.registry.rollout()
        if request.adapter.strip():
            try:
                adapter = await self.registry.resolve(request.adapter, rollout)
            except UnknownAdapter as exc:
                raise AskError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
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
                    filters=request.filters,
                    include_query_embedding=True,
                ),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise AskError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "retrieval did not answer within the deadline",
                ) from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise AskError(exc.code(), f"retrieval: {exc.details()}") from exc
            raise AskError(
                grpc.StatusCode.UNAVAILABLE,
                f"retrieve service unavailable ({exc.code().name}): {exc.details()}",
            ) from exc

    async def answer(
        self,
        request: infer_pb2.AskRequest,
        caller: str,
        deadline_s: float | None,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> Answer:
        start = time.perf_counter()
        budget = min(
            deadline_s or self.settings.infer_default_deadline_s,
            self.settings.infer_default_deadline_s,
        )

        def remaining() -> float:
            left = budget - (time.perf_counter() - start) - 0.02
            if left <= 0:
                raise AskError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
            return left

        self.validate(request)
        request_id = uuid.uuid4().hex
        chosen = await self.choose(request, caller)
        t = time.perf_counter()
        search = await self.search(request, remaining())
        retrieve_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        passages = [Passage(h.doc_id, h.chunk_id, h.title, h.text, h.score) for h in search.hits]
        candidates = list(request.candidates)
        prompt = build_prompt(
            request.question,
            passages,
            request.template or self.settings.infer_template,
            self.settings.infer_max_context_chars,
            candidates,
        )
        llm_request = LLMRequest(
            prompt=prompt.user,
            system=prompt.system,
            adapter=chosen.adapter,
            max_new_tokens=request.max_tokens or self.settings.infer_default_max_tokens,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            stop=list(request.stop),
            candidates=candidates,
            ignore_eos=request.ignore_eos,
        )
        prompt_ms = (time.perf_counter() - t) * 1000
        generation = await self._generate(llm_request, remaining(), on_text)
        mirrored = False
        if chosen.mirror and self.settings.infer_max_shadow_inflight > 0:
            if self.shadow_inflight < self.settings.infer_max_shadow_inflight:
                mirrored = True
                self._spawn(
                    self._shadow(request_id, request.question, llm_request, chosen, generation)
                )
            else:
                MIRRORS.labels("skipped_busy").inc()
        if candidates:
            probs = (
                softmax(generation.candidate_logprobs) if generation.candidate_logprobs else [0.0]
            )
            confidence = max(probs)
        else:
            confidence = math.exp(generation.mean_logprob) if generation.completion_tokens else 0.0
        cited = referenced_numbers(generation.text)
        latency = events_pb2.LatencyBreakdown(
            retrieve_ms=retrieve_ms,
            prompt_ms=prompt_ms,
            generate_ms=generation.latency_ms,
            compute_ms=generation.compute_ms,
            total_ms=(time.perf_counter() - start) * 1000,
        )
        response = infer_pb2.AskResponse(
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
                for i, p in enumerate(prompt.passages, start=1)
            ],
            adapter=generation.adapter or chosen.adapter,
            route=chosen.route,
            confidence=confidence,
            latency=latency,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            finish_reason=generation.finish_reason,
            candidate_logprobs=generation.candidate_logprobs,
            batch_size=generation.batch_size,
        )
        event = events_pb2.InferenceEvent(
            header=new_header("infer", request_id),
            request_id=request_id,
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
            route=chosen.route,
            answer=generation.text,
            confidence=confidence,
            latency=latency,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            candidates=candidates,
            candidate_logprobs=generation.candidate_logprobs,
            mirrored=mirrored,
        )
        self.events.publish(self.settings.topic_inference, request_id, event)
        self._spawn(self.remember(request_id, request.question))
        return Answer(response, event)

    async def remember(self, request_id: str, question: str) -> None:
        """Keeps the question of a request for a while, so feedback on it (which names only the
        request id) can carry the question to the trainer."""
        try:
            await self.registry.redis.set(
                request_key(self.settings.redis_prefix, request_id),
                question,
                ex=self.settings.infer_request_ttl_s,
            )
        except Exception as exc:  # an answer never fails for this
            log.warning("could not record request %s: %s", request_id, exc)

    async def question_of(self, request_id: str) -> str:
        raw = await self.registry.redis.get(request_key(self.settings.redis_prefix, request_id))
        return text(raw) if raw else ""

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
        except TritonUnavailable as exc:
            raise AskError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except TritonDeadline as exc:
            raise AskError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from exc
        except TritonRejected as exc:
            raise AskError(
                grpc.StatusCode.FAILED_PRECONDITION, f"the model refused: {exc}"
            ) from exc

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
        scored = bool(live_request.candidates)

        def confidence(g: Generation) -> float:
            if scored and g.candidate_logprobs:
                return max(softmax(g.candidate_logprobs))
            return math.exp(g.mean_logprob) if g.completion_tokens else 0.0

        pair = events_pb2.ShadowPairEvent(
            header=new_header("infer", request_id),
            request_id=request_id,
            question=question,
            live_adapter=live.adapter or chosen.adapter,
            shadow_adapter=chosen.mirror,
            live_answer=live.text,
            shadow_answer=shadow.text,
            agreement=0.0 if error else agreement(live.text, shadow.text, scored),
            live_confidence=confidence(live),
            shadow_confidence=confidence(shadow),
            live_generate_ms=live.latency_ms,
            shadow_generate_ms=shadow.latency_ms,
            shadow_error=error,
        )
        self.events.publish(self.settings.topic_shadow, request_id, pair)

    async def wait_background(self, timeout_s: float) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)


def _caller(request: infer_pb2.AskRequest, context: grpc.aio.ServicerContext) -> str:
    if request.caller:
        return str(request.caller)
    for key, value in context.invocation_metadata() or ():
        if key == "x-caller-id":
            return str(value)
    return ""


class InferServicer(infer_pb2_grpc.InferServiceServicer):
    def __init__(self, answerer: Answerer, settings: InferSettings):
        self.answerer = answerer
        self.settings = settings

    async def Ask(self, request, context):  # type: ignore[no-untyped-def]
        try:
            result = await self.answerer.answer(
                request, _caller(request, context), context.time_remaining()
            )
        except AskError as exc:
            await context.abort(exc.code, exc.message)
        return result.response

    async def AskStream(self, request, context) -> AsyncIterator[infer_pb2.AskChunk]:  # type: ignore[no-untyped-def,override]
        queue: asyncio.Queue[infer_pb2.AskChunk | Exception | None] = asyncio.Queue()

        async def on_text(piece: str) -> None:
            await queue.put(infer_pb2.AskChunk(text=piece))

        async def produce() -> None:
            try:
                result = await self.answerer.answer(
                    request, _caller(request, context), context.time_remaining(), on_text
                )
                await queue.put(infer_pb2.AskChunk(final=result.response))
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        task = asyncio.ensure_future(produce())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, AskError):
                    await context.abort(item.code, item.message)
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            task.cancel()

    async def SubmitFeedback(self, request, context):  # type: ignore[no-untyped-def]
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        if request.rating not in (-1, 0, 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rating must be -1, 0 or 1")
        if request.rating == 0 and not request.correction and not request.comment:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "feedback needs a rating, a correction or a comment",
            )
        event = events_pb2.FeedbackEvent(
            header=new_header("infer", request.request_id),
            request_id=request.request_id,
            rating=request.rating,
            correction=request.correction,
            comment=request.comment,
            caller=request.caller,
            question=await self.answerer.question_of(request.request_id),
        )
        self.answerer.events.publish(self.settings.topic_feedback, request.request_id, event)
        return infer_pb2.FeedbackResponse(event_id=event.header.event_id)


def _rollout_proto(r: Rollout) -> infer_pb2.RolloutState:
    return infer_pb2.RolloutState(
        live=r.live,
        candidate=r.candidate,
        mode=r.mode,
        shadow_share=r.shadow_share,
        canary_share=r.canary_share,
        version=r.version,
        updated_at_ms=r.updated_at_ms,
        history=r.history,
    )


def _aliases(adapter_id: str, r: Rollout) -> list[str]:
    names = []
    if r.live == adapter_id:
        names.append("live")
    if r.candidate == adapter_id:
        names.append("candidate")
        if r.mode in ("shadow", "canary"):
            names.append(r.mode)
    return names


class AdapterAdminServicer(infer_pb2_grpc.AdapterAdminServiceServicer):
    def __init__(self, answerer: Answerer, settings: InferSettings):
        self.registry = answerer.registry
        self.llm = answerer.llm
        self.events = answerer.events
        self.settings = settings
        # What Triton said it holds, from its last control reply.
        self.known_loaded: set[str] = set()

    async def _resolve(self, name: str, context: grpc.aio.ServicerContext) -> str:
        try:
            return await self.registry.resolve(name)
        except UnknownAdapter as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise

    async def _loaded(self) -> set[str]:
        try:
            self.known_loaded = set((await self.llm.control("list", timeout_s=5)).get("loaded", []))
        except Exception:
            return set()
        return self.known_loaded

    async def _load(
        self, adapter_id: str, context: grpc.aio.ServicerContext, force: bool = False
    ) -> dict[str, Any]:
        if adapter_id == BASE:
            return {"load_s": 0.0, "loaded": sorted(self.known_loaded)}
        if adapter_id in self.known_loaded and not force:
            # A control call waits for the batch Triton is running; skipping it keeps a flip
            # instant. Should Triton have evicted it since, the engine reloads it on first use.
            return {"load_s": 0.0, "loaded": sorted(self.known_loaded)}
        try:
            reply = await self.llm.control("load", adapter_id)
        except TritonUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        except TritonRejected as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"Triton refused: {exc}")
            raise
        self.known_loaded = set(reply.get("loaded", []))
        return reply

    def _event(self, action: str, adapter_id: str, r: Rollout | None, reason: str = "") -> None:
        event = events_pb2.AdapterEvent(
            header=new_header("infer"), action=action, adapter_id=adapter_id, reason=reason
        )
        if r is not None:
            event.live, event.candidate, event.mode = r.live, r.candidate, r.mode
            event.share = r.canary_share if r.mode == "canary" else r.shadow_share
            event.rollout_version = r.version
        self.events.publish(self.settings.topic_adapters, adapter_id or "-", event)

    def _status(self, info: AdapterInfo, r: Rollout, loaded: set[str]) -> infer_pb2.AdapterStatus:
        return infer_pb2.AdapterStatus(
            id=info.id,
            base_model=info.base_model,
            rank=info.rank,
            alpha=info.alpha,
            target_modules=info.target_modules,
            size_bytes=info.size_bytes,
            created_at_ms=info.created_at_ms,
            source=info.source,
            parent=info.parent,
            description=info.description,
            lineage_json=json.dumps(info.lineage, sort_keys=True),
            aliases=_aliases(info.id, r),
            loaded=info.id in loaded,
        )

    async def ListAdapters(self, request, context):  # type: ignore[no-untyped-def]
        r = await self.registry.rollout()
        loaded = await self._loaded()
        infos = await self.registry.list()
        return infer_pb2.ListAdaptersResponse(
            adapters=[self._status(i, r, loaded) for i in infos], rollout=_rollout_proto(r)
        )

    async def GetAdapter(self, request, context):  # type: ignore[no-untyped-def]
        adapter_id = await self._resolve(request.adapter, context)
        if adapter_id == BASE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "'base' is the model itself")
        info = await self.registry.get(adapter_id)
        if info is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown adapter {adapter_id}")
        assert info is not None
        return self._status(info, await self.registry.rollout(), await self._loaded())

    async def RegisterAdapter(self, request, context):  # type: ignore[no-untyped-def]
        path = Path(request.path)
        if not request.path or not await asyncio.to_thread(path.is_dir):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{request.path!r} is not a readable directory"
            )
        try:
            info, new = await self.registry.register(
                path, parent=request.parent, description=request.description
            )
        except (ValueError, OSError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        if new:
            self._event("registered", info.id, None)
        if request.load:
            await self._load(info.id, context)
            self._event("loaded", info.id, None)
        return self._status(info, await self.registry.rollout(), await self._loaded())

    async def LoadAdapter(self, request, context):  # type: ignore[no-untyped-def]
        adapter_id = await self._resolve(request.adapter, context)
        reply = await self._load(adapter_id, context, force=True)
        self._event("loaded", adapter_id, None)
        return infer_pb2.LoadAdapterResponse(
            adapter_id=adapter_id, load_s=float(reply.get("load_s", 0)), loaded=reply["loaded"]
        )

    async def UnloadAdapter(self, request, context):  # type: ignore[no-untyped-def]
        adapter_id = await self._resolve(request.adapter, context)
        r = await self.registry.rollout()
        if adapter_id in (r.live, r.candidate):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{adapter_id} is {' and '.join(_aliases(adapter_id, r))}; "
                "change the rollout first",
            )
        try:
            reply = await self.llm.control("unload", adapter_id)
        except TritonUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        self.known_loaded = set(reply.get("loaded", []))
        self._event("unloaded", adapter_id, r)
        return infer_pb2.LoadAdapterResponse(adapter_id=adapter_id, loaded=reply["loaded"])

    async def SetRollout(self, request, context):  # type: ignore[no-untyped-def]
        mode = request.mode or "off"
        previous = await self.registry.rollout()
        if mode not in MODES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"mode must be one of {', '.join(MODES)}"
            )
        adapter_id = ""
        if mode != "off":
            adapter_id = await self._resolve(request.adapter, context)
            await self._load(adapter_id, context)  # before any traffic is sent to it
        share = request.share if request.HasField("share") else None
        try:
            await self.registry.set_candidate(
                adapter_id,
                mode,
                shadow_share=share if mode == "shadow" else None,
                canary_share=share if mode == "canary" else None,
            )
        except RolloutError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        r = await self.registry.rollout()
        if mode == "off" and previous.candidate and request.reason:
            # A candidate turned off with a reason (the rollout policy, or a person) is retired.
            self._event("retired", previous.candidate, r, request.reason)
        else:
            self._event("candidate", adapter_id, r, request.reason)
        return _rollout_proto(r)

    async def Promote(self, request, context):  # type: ignore[no-untyped-def]
        current = await self.registry.rollout()
        target = await self._resolve(request.adapter, context) if request.adapter else ""
        if not target and not current.candidate:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "no candidate to promote; name an adapter"
            )
        # Load first: the flip itself is one Redis write, and the first request after it must
        # not wait for weights.
        await self._load(target or current.candidate, context)
        try:
            await self.registry.promote(target)
        except RolloutError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        r = await self.registry.rollout()
        self._event("promoted", r.live, r, request.reason)
        return _rollout_proto(r)

    async def Rollback(self, request, context):  # type: ignore[no-untyped-def]
        current = await self.registry.rollout()
        if not current.history:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing to roll back to")
        await self._load(current.history[0], context)
        try:
            await self.registry.rollback()
        except RolloutError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        r = await self.registry.rollout()
        self._event("rolled_back", r.live, r, request.reason)
        return _rollout_proto(r)

    async def GetRollout(self, request, context):  # type: ignore[no-untyped-def]
        return _rollout_proto(await self.registry.rollout())


def build(
    app: GrpcApp, settings: InferSettings
) -> tuple[Answerer, AIOKafkaProducer, TritonLLM, Any]:
    redis = connect(settings.redis_url)
    llm = TritonLLM(settings.endpoint("triton"), settings.triton_model)
    retrieve_channel = channel(settings.endpoint("retrieve"))
    producer = make_producer(settings, "infer")
    answerer = Answerer(
        settings,
        AdapterRegistry(redis, settings),
        llm,
        retrieve_pb2_grpc.RetrieveServiceStub(retrieve_channel),
        EventPublisher(producer, "infer"),
    )
    infer_pb2_grpc.add_InferServiceServicer_to_server(InferServicer(answerer, settings), app.server)
    infer_pb2_grpc.add_AdapterAdminServiceServicer_to_server(
        AdapterAdminServicer(answerer, settings), app.server
    )
    for name in ("InferService", "AdapterAdminService"):
        app.add_service(infer_pb2.DESCRIPTOR.services_by_name[name].full_name)
    app.add_check("redis", lambda: ping(redis))
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    app.add_check("triton", llm.ready)
    app.add_check("retrieve", lambda: is_serving(retrieve_channel))
    return answerer, producer, llm, (redis, retrieve_channel)


async def main() -> None:
    settings = InferSettings()
    app = service_app("infer", settings, settings.infer_port, settings.infer_metrics_port)
    answerer, producer, llm, (redis, retrieve_channel) = build(app, settings)

    async def start() -> None:
        await producer.start()
        app.spawn(answerer.events.run(), "event-publisher")

    async def stop() -> None:
        await answerer.wait_background(settings.shutdown_grace_s)
        await answerer.events.drain()
        await producer.stop()
        await llm.close()
        await retrieve_channel.close()
        await redis.aclose()

    app.on_start(start)
    app.on_stop(stop)
    await app.serve()
