"""Trainer service: the gRPC TrainerService, stream agents (services/common/streams.py)
consuming retrain requests (ks.retrain), feedback corrections (ks.feedback) and shadow pairs
(ks.inference.shadow), and the worker that runs one training job at a time in a child process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer

from knowstream.infer.v1 import infer_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.adapters import AdapterRegistry
from services.common.clients import channel, client_options, is_serving
from services.common.errors import InvalidArgument, NotFound
from services.common.grpcserver import service_app
from services.common.kafka import BadEvent, make_producer
from services.common.metrics import EVENTS_CONSUMED, EVENTS_PRODUCED
from services.common.net import kafka_alive
from services.common.redisutil import connect, ping
from services.common.streams import StreamHealth, attach, dead_letter, make_faust_app
from services.llm.prompts import Passage
from services.llm.settings import PromptSettings
from services.llm.triton import TritonLLM
from services.trainer.jobs import Publish, Trainer, triton_score
from services.trainer.knowledge_job import remembered, triton_logprobs
from services.trainer.settings import TrainerSettings
from services.trainer.sources import Recipe, Search
from services.trainer.store import TrainerStore, unfinished

log = logging.getLogger(__name__)


def build_stream(settings: TrainerSettings, trainer: Trainer, health: StreamHealth) -> Any:
    app = make_faust_app(settings, settings.trainer_group)

    def topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes)

    def consumer(name: str, accept: Any) -> Any:
        dlq = topic(settings.dlq(name))

        async def consume(stream: Any) -> None:
            try:
                async for event in stream.events():
                    EVENTS_CONSUMED.labels("trainer", name).inc()
                    message = event.message
                    try:
                        await accept(message)
                    except BadEvent as exc:
                        await (await dead_letter(dlq, message, str(exc), "trainer"))
            except Exception as exc:
                health.crashed(exc)
                raise

        return consume

    async def retrain(message: Any) -> None:
        await trainer.on_retrain(message.value)

    async def feedback(message: Any) -> None:
        where = f"{message.topic}:{message.partition}:{message.offset}"
        await trainer.policy.on_feedback(message.value, where)

    async def shadow(message: Any) -> None:
        await trainer.policy.on_shadow_pair(message.value)

    for name, accept in (
        (settings.topic_retrain, retrain),
        (settings.topic_feedback, feedback),
        (settings.topic_shadow, shadow),
    ):
        app.agent(topic(name), name=f"trainer-{name}", concurrency=1)(consumer(name, accept))
    return app


def policy_proto(mode: str, samples: int, policy: dict[str, str], tally: Any) -> trainer_pb2.Policy:
    return trainer_pb2.Policy(
        mode=mode,
        shadow_samples=samples,
        watching=policy.get("watching", ""),
        pairs=tally.pairs if tally else 0,
        agreement=tally.agreement if tally else 0.0,
        shadow_errors=tally.errors if tally else 0,
        feedback_for_candidate=tally.feedback_shadow if tally else 0,
        feedback_for_live=tally.feedback_live if tally else 0,
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, settings: TrainerSettings, trainer: Trainer):
        self.settings = settings
        self.trainer = trainer

    async def Train(
        self, request: trainer_pb2.TrainRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Job:
        job, _ = await self.trainer.submit(request)  # InvalidArgument, NotFound: answered
        return job

    async def _job(self, job_id: str) -> trainer_pb2.Job:
        job = await self.trainer.store.job(job_id) if job_id else None
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        assert job is not None
        return job

    async def GetJob(
        self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Job:
        return await self._job(request.id)

    async def WatchJob(
        self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.Job]:
        job = await self._job(request.id)
        yield job
        last = job.SerializeToString()
        while unfinished(job):
            async with self.trainer.changed:
                try:
                    await asyncio.wait_for(self.trainer.changed.wait(), timeout=2.0)
                except TimeoutError:
                    pass
            job = await self._job(request.id)
            raw = job.SerializeToString()
            if raw != last:
                last = raw
                yield job

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListJobsResponse:
        return trainer_pb2.ListJobsResponse(
            jobs=await self.trainer.store.jobs(min(request.limit or 20, 500))
        )

    async def CancelJob(
        self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Job:
        await self.trainer.cancel(request.id)  # NotFound, FailedPrecondition: answered
        return await self._job(request.id)

    async def GetPolicy(
        self, request: trainer_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Policy:
        policy = await self.trainer.store.policy()
        watching = policy.get("watching", "")
        if watching and (await self.trainer.registry.rollout()).candidate != watching:
            # Taken out of shadow by hand since: the policy no longer watches it.
            await self.trainer.store.set_policy(watching="", job="")
            policy["watching"] = watching = ""
        tally = await self.trainer.store.tally(watching) if watching else None
        return policy_proto(
            await self.trainer.policy.mode(), self.settings.trainer_shadow_samples, policy, tally
        )

    async def SetPolicy(
        self, request: trainer_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Policy:
        if request.mode not in ("auto", "manual"):
            raise InvalidArgument("mode must be auto or manual")
        await self.trainer.store.set_policy(mode=request.mode)
        return await self.GetPolicy(trainer_pb2.GetPolicyRequest(), context)


def recipe(settings: TrainerSettings, prompts: PromptSettings) -> Recipe:
    """How a job's dataset is built: retrieval and context budgets as the infer service uses
    them (its prompt settings), the rest from the trainer's."""
    return Recipe(
        k=prompts.infer_default_k,
        max_context_chars=prompts.infer_max_context_chars,
        train_context_chars=min(settings.trainer_context_chars, prompts.infer_max_context_chars),
        with_reasons=settings.trainer_with_reasons,
        domain_k=settings.trainer_domain_k,
        max_documents=settings.trainer_max_documents,
        max_recent_documents=settings.trainer_max_recent_documents,
        replay_share=settings.trainer_replay_share,
        eval_share=settings.trainer_eval_share,
        seed=settings.trainer_seed,
        concurrency=settings.trainer_retrieve_concurrency,
    )


def retrieve_search(retrieve: retrieve_pb2_grpc.RetrieveServiceStub, timeout_s: float) -> Search:
    """The retrieve service's Search as the dataset builder's evidence source."""

    async def search(question: str, k: int) -> list[Passage]:
        reply = await retrieve.Search(
            retrieve_pb2.SearchRequest(query=question, k=k), timeout=timeout_s
        )
        return [Passage(h.doc_id, h.chunk_id, h.title, h.text, h.score) for h in reply.hits]

    return search


def event_publisher(producer: AIOKafkaProducer) -> Publish:
    async def publish(topic: str, key: str, value: bytes) -> None:
        await producer.send_and_wait(topic, value, key=key.encode())
        EVENTS_PRODUCED.labels("trainer", topic).inc()

    return publish


async def main() -> None:
    settings = TrainerSettings()
    infer_settings = PromptSettings()
    app = service_app("trainer", settings, settings.trainer_port, settings.trainer_metrics_port)
    redis = connect(settings.redis_url)
    producer = make_producer(settings, "trainer")
    registry = AdapterRegistry(redis, settings)
    store = TrainerStore(redis, settings.redis_prefix)
    retrieve_channel = channel(settings.endpoint("retrieve"))
    infer_channel = channel(settings.endpoint("infer"))
    llm = TritonLLM(settings.endpoint("triton"), settings.triton_model, client_options(settings))

    trainer = Trainer(
        settings,
        store,
        registry,
        infer_pb2_grpc.AdapterAdminServiceStub(infer_channel),
        retrieve_search(
            retrieve_pb2_grpc.RetrieveServiceStub(retrieve_channel), settings.rpc_timeout_s * 3
        ),
        triton_score(llm, timeout_s=120),
        event_publisher(producer),
        recipe(settings, infer_settings),
        remembered(triton_logprobs(llm, timeout_s=120), store),
    )
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
        TrainerServicer(settings, trainer), app.server
    )
    app.add_service(trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name)

    async def start() -> None:
        await producer.start()
        app.spawn(trainer.worker(), "trainer-worker")

    async def stop() -> None:
        if trainer.process is not None and trainer.process.returncode is None:
            # The job stays "training": the next start resumes it from its last checkpoint.
            trainer.process.terminate()
        await producer.stop()
        await retrieve_channel.close(None)
        await infer_channel.close(None)
        await llm.close()
        await redis.aclose()

    app.on_start(start)
    app.on_stop(stop)
    health = StreamHealth()
    attach(app, build_stream(settings, trainer, health), health, "trainer-stream")
    app.add_check("redis", lambda: ping(redis))
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    app.add_check("triton", llm.ready)
    app.add_check("retrieve", lambda: is_serving(retrieve_channel))
    app.add_check("infer", lambda: is_serving(infer_channel))
    await app.serve()
