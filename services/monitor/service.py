"""Monitor service: a stream consuming inference, shadow-pair and feedback events into the
drift monitor (and embedded chunks, to follow how ingested documents close knowledge gaps), and
the gRPC MonitorService (status, reference, events) in one process."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
from aiokafka import AIOKafkaProducer, ConsumerRecord

from knowstream.embed.v1 import embed_pb2, embed_pb2_grpc
from knowstream.events.v1 import events_pb2
from knowstream.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.common.adapters import AdapterRegistry
from services.common.clients import channel
from services.common.consumer import Rejects, StreamConsumer, attach_stream
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.grpcserver import service_app
from services.common.kafka import BadEvent, make_producer
from services.common.metrics import EVENTS_PRODUCED
from services.common.net import kafka_alive
from services.common.redisutil import connect, ping
from services.monitor.monitor import Monitor
from services.monitor.settings import MonitorSettings
from services.monitor.store import LogEntry, MonitorStore
from services.monitor.windowing import gap_covered_share

log = logging.getLogger(__name__)

# Texts per Embed call when a reference is given as texts (the embed service's limit is 256).
EMBED_BATCH = 128
MAX_REFERENCE_TEXTS = 20_000


def build_stream(
    settings: MonitorSettings, monitor: Monitor, producer: AIOKafkaProducer, redis: Any
) -> StreamConsumer:
    """One consumer for the monitor's four topics; events it cannot read go to their topic's
    dead-letter topic (and are counted in the drift status)."""

    def events(accept: Any, then: Any = None) -> Any:
        async def handle(records: list[ConsumerRecord]) -> Rejects:
            rejects: Rejects = []
            for record in records:
                try:
                    await accept(record.value)
                except BadEvent as exc:
                    rejects.append((record, str(exc)))
            for _ in rejects:
                await monitor.store.count_dead_letter()
            if then is not None:
                await then()
            return rejects

        return handle

    async def embedded_chunks(records: list[ConsumerRecord]) -> None:
        await monitor.accept_chunks([r.value for r in records])

    handlers = {
        settings.topic_inference: events(monitor.accept_inference, monitor.advance),
        settings.topic_shadow: events(monitor.accept_shadow),
        settings.topic_feedback: events(monitor.accept_feedback),
        settings.topic_embedded: embedded_chunks,
    }
    return StreamConsumer(
        settings,
        "monitor",
        settings.monitor_group,
        handlers,
        producer=producer,
        redis=redis,
        max_records=settings.monitor_stream_batch,
        poll_timeout_ms=max(1, int(settings.monitor_stream_wait_s * 1000)),
    )


def reference_info(info: dict[str, Any]) -> monitor_pb2.ReferenceInfo:
    return monitor_pb2.ReferenceInfo(
        id=info["id"],
        source=info["source"],
        description=info.get("description", ""),
        size=info["size"],
        dimension=info["dimension"],
        embedding_model=info["embedding_model"],
        created_ms=info["created_ms"],
        sigma2=info["sigma2"],
        topics=info["topics"],
    )


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(
        self,
        settings: MonitorSettings,
        monitor: Monitor,
        registry: AdapterRegistry,
        embed: embed_pb2_grpc.EmbedServiceStub,
    ):
        self.settings = settings
        self.monitor = monitor
        self.registry = registry
        self.embed = embed

    async def GetDriftStatus(
        self, request: monitor_pb2.GetDriftStatusRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.DriftStatus:
        s = self.settings
        state = await self.monitor.store.state()
        count = min(request.windows or 20, s.monitor_history)
        windows = []
        for raw in await self.monitor.store.windows(count):
            w = events_pb2.DriftWindow()
            w.ParseFromString(raw)
            windows.append(w)
        policy = state.policy
        status = monitor_pb2.DriftStatus(
            settings=monitor_pb2.PolicySettings(
                window=s.monitor_window,
                step=self.monitor.step,
                permutations=s.monitor_permutations,
                p_value=s.monitor_p_value,
                kl_threshold=s.monitor_kl_threshold,
                mmd_threshold=s.monitor_mmd_threshold,
                consecutive=s.monitor_consecutive,
                cooldown_windows=s.monitor_cooldown_windows,
                gap_score=s.monitor_gap_score,
                gap_share=s.monitor_gap_share,
            ),
            questions_seen=state.questions,
            # Normally under one window; capped so a status never reads a large backlog.
            pending=await self.monitor.store.pending(state.cursor, 4 * s.monitor_window),
            windows=windows,
            streak=len(policy.get("streak", [])),
            cooldown_until=int(policy.get("cooldown_until", -1)),
            events=int(policy.get("events", 0)),
            dead_letters=state.dead_letters,
        )
        if self.monitor.reference is not None:
            status.reference.CopyFrom(reference_info(self.monitor.reference.info))
        for gap in (await self.monitor.store.gaps())[:20]:
            status.gaps.append(
                monitor_pb2.KnowledgeGapStatus(
                    idempotency_key=gap["key"],
                    created_ms=gap["created_ms"],
                    questions=gap["questions"],
                    covered_share=gap_covered_share(gap, s.monitor_gap_score),
                    closed_ms=gap["closed_ms"],
                )
            )
        return status

    async def SetReference(
        self, request: monitor_pb2.SetReferenceRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ReferenceInfo:
        source = request.WhichOneof("source")
        limit = self.settings.monitor_log_max
        entries: list[LogEntry] = []
        if source is None:
            raise InvalidArgument("name a source: time_range, texts, adapter or recent")
        elif source == "time_range":
            r = request.time_range
            if r.to_ms and r.to_ms <= r.from_ms:
                raise InvalidArgument("time_range: to_ms must be after from_ms")
            entries = await self.monitor.store.entries_between(r.from_ms, r.to_ms, limit)
        elif source == "recent":
            if request.recent == 0:
                raise InvalidArgument("recent must be > 0")
            entries = await self.monitor.store.latest_entries(min(request.recent, limit))
        if entries:
            embeddings = np.stack([e.embedding for e in entries])
            texts = [e.question for e in entries]
        elif source in ("time_range", "recent"):
            raise InvalidArgument(
                f"the monitor holds no questions for that {source.replace('_', ' ')}"
            )
        else:
            texts = await self._texts(request, source)
            embeddings = await self._embed(texts)
        try:
            info = await self.monitor.set_reference(
                embeddings, texts, source, request.description, request.restart_windows
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        # Questions already waiting may fill windows against the new reference now.
        await self.monitor.advance()
        return reference_info(info)

    async def _texts(self, request: Any, source: str) -> list[str]:
        if source == "texts":
            texts = [t for t in request.texts.texts]
            if any(not t.strip() for t in texts):
                raise InvalidArgument("empty text in texts")
        else:
            adapter = await self.registry.resolve(request.adapter or "live")  # or NotFound
            texts = await self.registry.training_questions(adapter, MAX_REFERENCE_TEXTS)
            if not texts:
                raise FailedPrecondition(
                    f"adapter {adapter} has no recorded training questions (the trainer "
                    "records them for the adapters it trains)"
                )
        if len(texts) > MAX_REFERENCE_TEXTS:
            raise InvalidArgument(
                f"{len(texts)} texts; a reference takes at most {MAX_REFERENCE_TEXTS}"
            )
        return texts

    async def _embed(self, texts: list[str]) -> np.ndarray:
        vectors: list[Any] = []
        for i in range(0, len(texts), EMBED_BATCH):
            try:
                reply = await self.embed.Embed(
                    embed_pb2.EmbedRequest(texts=texts[i : i + EMBED_BATCH]),
                    timeout=self.settings.rpc_timeout_s * 3,
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                message = f"embedding the reference texts failed: {code.name}: {exc.details()}"
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(message) from exc
                raise Unavailable(message) from exc
            if reply.model != self.settings.embed_model:
                raise FailedPrecondition(
                    f"the embed service runs {reply.model!r}; the monitor compares "
                    f"{self.settings.embed_model!r} embeddings"
                )
            vectors.extend(e.values for e in reply.embeddings)
        return np.asarray(vectors, dtype=np.float32)

    async def ListEvents(
        self, request: monitor_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ListEventsResponse:
        events = []
        for raw in await self.monitor.store.events(min(request.limit or 20, 1000)):
            event = events_pb2.DriftEvent()
            event.ParseFromString(raw)
            events.append(event)
        return monitor_pb2.ListEventsResponse(events=events)


async def main() -> None:
    settings = MonitorSettings()
    app = service_app("monitor", settings, settings.monitor_port, settings.monitor_metrics_port)
    redis = connect(settings.redis_url)
    producer = make_producer(settings, "monitor")
    app.audit.use(producer)
    registry = AdapterRegistry(redis, settings)
    store = MonitorStore(
        redis, settings.redis_prefix, settings.monitor_dedup_ttl_s, settings.monitor_log_max
    )

    async def publish(topic: str, key: str, value: bytes) -> None:
        await producer.send_and_wait(topic, value, key=key.encode())
        EVENTS_PRODUCED.labels("monitor", topic).inc()

    async def live_adapter() -> str:
        return (await registry.rollout()).live

    monitor = Monitor(settings, store, publish, live_adapter)
    embed_channel = channel(settings.endpoint("embed"))
    monitor_pb2_grpc.add_MonitorServiceServicer_to_server(
        MonitorServicer(
            settings, monitor, registry, embed_pb2_grpc.EmbedServiceStub(embed_channel)
        ),
        app.server,
    )
    app.add_service(monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name)

    async def start() -> None:
        await producer.start()
        # Windows left over from before a restart, and records committed but not yet sent.
        await monitor.start()

    async def stop() -> None:
        await producer.stop()
        await embed_channel.close(None)
        await redis.aclose()

    app.on_start(start)
    app.on_stop(stop)
    # Registered after start: the stream starts once the producer and the monitor are ready.
    attach_stream(app, build_stream(settings, monitor, producer, redis), "monitor-stream")
    app.add_check("redis", lambda: ping(redis))
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    await app.serve()
