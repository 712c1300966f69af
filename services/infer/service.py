"""infer service: InferService (Ask, AskStream, SubmitFeedback) and AdapterAdminService.

Answers come from the LLM in Triton; evidence from the retrieve service; adapters, aliases and
the rollout state from the Redis registry. Aliases are resolved here, per request, from one
Redis hash, so a flip reaches the next request as soon as the flip call returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2_grpc
from services.common.adapters import (
    AdapterRegistry,
)
from services.common.clients import channel, client_options, is_serving
from services.common.grpcserver import GrpcApp, service_app
from services.common.kafka import make_producer, new_header
from services.common.net import kafka_alive
from services.common.publisher import EventPublisher
from services.common.redisutil import connect, ping
from services.infer.admin import AdapterAdminServicer
from services.infer.answerer import Answerer
from services.infer.requests import RecentRequests
from services.infer.settings import InferSettings
from services.infer.validation import check_feedback
from services.llm.triton import (
    TritonLLM,
)

log = logging.getLogger(__name__)


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

    async def Ask(
        self, request: infer_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.AskResponse:
        result = await self.answerer.answer(
            request, _caller(request, context), context.time_remaining()
        )
        return result.response

    async def AskStream(
        self, request: infer_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[infer_pb2.AskChunk]:
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
                if isinstance(item, Exception):
                    raise item  # the interceptor answers it with its code
                yield item
        finally:
            task.cancel()

    async def Score(
        self, request: infer_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.ScoreResponse:
        return await self.answerer.score(request, context.time_remaining())

    async def SubmitFeedback(
        self, request: infer_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.FeedbackResponse:
        check_feedback(request, self.settings)  # InvalidArgument: the interceptor answers
        event = events_pb2.FeedbackEvent(
            header=new_header("infer"),
            request_id=request.request_id,
            rating=request.rating,
            correction=request.correction,
            comment=request.comment,
            caller=request.caller,
            question=await self.answerer.requests.question_of(request.request_id),
        )
        self.answerer.events.publish(self.settings.topic_feedback, request.request_id, event)
        return infer_pb2.FeedbackResponse(event_id=event.header.event_id)


def build(
    app: GrpcApp, settings: InferSettings
) -> tuple[Answerer, AIOKafkaProducer, TritonLLM, Any]:
    redis = connect(settings.redis_url)
    llm = TritonLLM(settings.endpoint("triton"), settings.triton_model, client_options(settings))
    retrieve_channel = channel(settings.endpoint("retrieve"))
    producer = make_producer(settings, "infer")
    answerer = Answerer(
        settings,
        AdapterRegistry(redis, settings),
        llm,
        retrieve_pb2_grpc.RetrieveServiceStub(retrieve_channel),
        EventPublisher(producer, settings, "infer"),
        RecentRequests(redis, settings.redis_prefix, settings.infer_request_ttl_s),
    )
    app.audit.use(producer)
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
