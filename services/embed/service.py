"""Embed service: the chunk stream and the gRPC EmbedService in one process."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np

from knowstream.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.consumer import attach_stream
from services.common.embedding import Embedder
from services.common.errors import InvalidArgument
from services.common.grpcserver import service_app
from services.common.kafka import make_producer
from services.common.net import kafka_alive
from services.common.redisutil import connect
from services.embed.settings import EmbedSettings
from services.embed.stream import build_stream

log = logging.getLogger(__name__)


class EmbedServicer(embed_pb2_grpc.EmbedServiceServicer):
    def __init__(self, embedder: Embedder, max_texts: int):
        self.embedder = embedder
        self.max_texts = max_texts

    async def Embed(
        self, request: embed_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embed_pb2.EmbedResponse:
        texts = list(request.texts)
        if not texts:
            raise InvalidArgument("no texts to embed")
        if len(texts) > self.max_texts:
            raise InvalidArgument(f"{len(texts)} texts; the limit is {self.max_texts}")
        if any(not t.strip() for t in texts):
            raise InvalidArgument("empty text in the request")
        vectors = await asyncio.to_thread(self.embedder.embed, texts)
        return embed_pb2.EmbedResponse(
            embeddings=[embed_pb2.Embedding(values=v.tolist()) for v in vectors],
            model=self.embedder.name,
            dimension=self.embedder.dimension,
        )

    async def GetModelInfo(
        self, request: embed_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> embed_pb2.ModelInfo:
        return embed_pb2.ModelInfo(
            model=self.embedder.name,
            dimension=self.embedder.dimension,
            max_tokens=self.embedder.max_tokens,
        )


async def main() -> None:
    settings = EmbedSettings()
    app = service_app("embed", settings, settings.embed_port, settings.embed_metrics_port)
    embedder = Embedder.from_settings(
        settings,
        max_tokens=settings.embed_max_tokens,
        batch_size=settings.embed_forward_batch,
        bf16=settings.embed_bf16,
        threads=settings.embed_threads or None,
    )

    async def embed(texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(embedder.embed, texts)

    embed_pb2_grpc.add_EmbedServiceServicer_to_server(
        EmbedServicer(embedder, settings.embed_max_texts), app.server
    )
    app.add_service(embed_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name)
    producer = make_producer(settings, "embed")
    # Redis holds the stream's fingerprints and health detail, both advisory: the chunks never
    # go there, and Embed answers without it (no readiness check on Redis here).
    redis = connect(settings.redis_url)

    async def start() -> None:
        await producer.start()

    async def stop() -> None:
        await producer.flush()
        await producer.stop()
        await redis.aclose()

    app.on_start(start)
    app.on_stop(stop)
    stream = build_stream(settings, embed, settings.embed_model, producer, redis)
    attach_stream(app, stream, "chunk-stream")
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    await app.serve()
