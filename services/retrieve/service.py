"""Retrieve service: consumes embedded chunks into the hybrid index and serves Search."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from knowstream.embed.v1 import embed_pb2, embed_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common import clients, redisutil
from services.common.access import narrow
from services.common.auth import caller_scope
from services.common.consumer import Handler, StreamConsumer, attach_stream
from services.common.embedding import Embedder
from services.common.errors import InvalidArgument, Unavailable
from services.common.grpcserver import service_app
from services.common.kafka import make_producer
from services.common.net import kafka_alive
from services.retrieve.dense import Filters, make_backend
from services.retrieve.index import FusionConfig, Hit, HybridIndex
from services.retrieve.indexer import Indexer, StoredOffsets
from services.retrieve.settings import RetrieveSettings
from services.retrieve.store import ChunkStore

log = logging.getLogger(__name__)

MODES = {
    retrieve_pb2.SEARCH_MODE_HYBRID: "hybrid",
    retrieve_pb2.SEARCH_MODE_DENSE: "dense",
    retrieve_pb2.SEARCH_MODE_BM25: "bm25",
}


Encode = Callable[[str], Awaitable[np.ndarray]]


def remote_encoder(stub: embed_pb2_grpc.EmbedServiceStub, timeout_s: float) -> Encode:
    """Queries embedded by the embed service (one model copy; one more network hop)."""

    async def encode(text: str) -> np.ndarray:
        reply = await stub.Embed(embed_pb2.EmbedRequest(texts=[text]), timeout=timeout_s)
        return np.asarray(reply.embeddings[0].values, dtype=np.float32)

    return encode


def local_encoder(embedder: Embedder) -> Encode:
    """Queries embedded in this process with the same model and runtime as the embed service:
    no hop, and search keeps working while the embed workers are busy or restarting."""

    async def encode(text: str) -> np.ndarray:
        return (await asyncio.to_thread(embedder.embed, [text]))[0]

    return encode


class QueryEmbedder:
    """Embeds queries, with a small LRU cache in front."""

    def __init__(self, encode: Encode, size: int):
        self.encode = encode
        self.size = size
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    async def __call__(self, text: str) -> np.ndarray:
        if text in self.cache:
            self.cache.move_to_end(text)
            return self.cache[text]
        vector = await self.encode(text)
        if self.size:
            self.cache[text] = vector
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return vector


class RetrieveServicer(retrieve_pb2_grpc.RetrieveServiceServicer):
    """Registered before the server starts; :meth:`attach` hands it the index once loaded."""

    def __init__(self, settings: RetrieveSettings, embed: QueryEmbedder):
        self.settings = settings
        self.embed = embed
        self._indexer: Indexer | None = None
        self.fusion = FusionConfig(
            settings.retrieve_dense_weight,
            settings.retrieve_bm25_weight,
            settings.retrieve_rrf_k,
            settings.retrieve_candidates,
        )

    def attach(self, indexer: Indexer) -> None:
        self._indexer = indexer

    async def _ready(self) -> Indexer:
        if self._indexer is None:
            raise Unavailable("the index is still loading")
        return self._indexer

    async def Search(
        self, request: retrieve_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieve_pb2.SearchResponse:
        start = time.perf_counter()
        index = (await self._ready()).index
        query = request.query.strip()
        if not query:
            raise InvalidArgument("query is empty")
        # LimitExceeded: the interceptor answers INVALID_ARGUMENT with the field and the limit.
        self.settings.check_text("query", request.query, "limit_query_chars")
        self.settings.check_search_filters(request.filters)
        k = request.k or self.settings.retrieve_default_k
        if k > self.settings.retrieve_max_k:
            raise InvalidArgument(f"k={k} is above the limit of {self.settings.retrieve_max_k}")
        mode = MODES.get(request.mode, "hybrid")
        f = request.filters
        # What the caller may read (its token's groups), narrowed by the groups the request
        # names: the infer service, which searches as the services' admin token, names its own
        # caller's groups there; a reader's request can narrow its own, never widen them.
        scope = narrow(caller_scope(), f.access.groups if f.HasField("access") else None)
        filters = Filters(
            frozenset(d.lower() for d in f.domains),
            frozenset(f.sources),
            frozenset(f.doc_ids),
            scope,
        )
        mask = index.filter_mask(filters)
        candidates = max(k, self.fusion.candidates)
        reply = retrieve_pb2.SearchResponse(mode=request.mode or retrieve_pb2.SEARCH_MODE_HYBRID)
        dense: list[tuple[int, float]] = []
        bm25: list[tuple[int, float]] = []
        if mode in ("hybrid", "dense"):
            t = time.perf_counter()
            try:
                vector = await self.embed(query)
            except grpc.RpcError as exc:
                raise Unavailable(f"embed service unavailable: {exc.details()}") from exc
            t2 = time.perf_counter()
            if request.include_query_embedding:
                reply.query_embedding.extend(np.asarray(vector, dtype=np.float32).ravel().tolist())
                reply.embedding_model = self.settings.embed_model
            dense = index.search_dense(vector, candidates, filters, mask)
            reply.embed_ms, reply.dense_ms = (t2 - t) * 1000, (time.perf_counter() - t2) * 1000
        if mode in ("hybrid", "bm25"):
            t = time.perf_counter()
            bm25 = index.search_bm25(query, candidates, mask)
            reply.bm25_ms = (time.perf_counter() - t) * 1000
        if mode == "hybrid":
            hits = index.fuse(dense, bm25, k, self.fusion)
        else:
            hits = index.single(dense if mode == "dense" else bm25, k, mode)
        reply.hits.extend(_hit_proto(h, index) for h in hits)
        reply.total_ms = (time.perf_counter() - start) * 1000
        return reply

    async def GetIndexStats(
        self, request: retrieve_pb2.GetIndexStatsRequest, context: grpc.aio.ServicerContext
    ) -> retrieve_pb2.IndexStats:
        indexer = await self._ready()
        index = indexer.index
        return retrieve_pb2.IndexStats(
            chunks=len(index),
            documents=index.documents,
            pending_chunks=len(indexer.pending),
            bm25_lag_chunks=index.lexical.pending_changes,
            dense_backend=index.dense.name,
            offsets=await indexer.store.offsets(),
        )


def _hit_proto(hit: Hit, index: HybridIndex) -> retrieve_pb2.SearchHit:
    c = hit.record.chunk
    return retrieve_pb2.SearchHit(
        doc_id=c.doc_id,
        chunk_id=c.chunk_id,
        title=c.title,
        text=c.text,
        score=hit.score,
        dense_score=hit.dense_score,
        bm25_score=hit.bm25_score,
        dense_rank=hit.dense_rank,
        bm25_rank=hit.bm25_rank,
        metadata=index.metadata(c),
        content_hash=c.content_hash,
        chunk_index=c.chunk_index,
        token_start=c.token_start,
        token_end=c.token_end,
        ingested_at_ms=c.ingested_at_ms,
    )


async def index_model(
    settings: RetrieveSettings, embedder: Embedder | None, embed: embed_pb2_grpc.EmbedServiceStub
) -> embed_pb2.ModelInfo:
    """The model (and so the index dimension) of the vectors indexed: the local query
    embedder's, else the embed service's, waited for and checked against KS_EMBED_MODEL."""
    if embedder is not None:
        return embed_pb2.ModelInfo(model=settings.embed_model, dimension=embedder.dimension)
    while True:
        try:
            info = await embed.GetModelInfo(embed_pb2.GetModelInfoRequest(), timeout=2)
            break
        except grpc.RpcError:
            log.info("waiting for the embed service")
            await asyncio.sleep(1)
    if info.model != settings.embed_model:
        raise RuntimeError(
            f"embed service runs {info.model!r}, retrieve expects {settings.embed_model!r}"
        )
    return info


def embedded_stream(
    settings: RetrieveSettings,
    handle: Handler,
    producer: AIOKafkaProducer,
    redis: aioredis.Redis,
    store: ChunkStore,
) -> StreamConsumer:
    """The embedded-chunk stream, its positions kept in Redis with the index (StoredOffsets)."""
    return StreamConsumer(
        settings,
        "retrieve",
        settings.retrieve_group,
        {settings.topic_embedded: handle},
        producer=producer,
        redis=redis,
        positions=StoredOffsets(store),
        max_records=settings.retrieve_poll_records,
        poll_timeout_ms=200,
        max_poll_records=settings.retrieve_poll_records,
    )


async def open_indexer(
    settings: RetrieveSettings,
    info: embed_pb2.ModelInfo,
    store: ChunkStore,
    stream: StreamConsumer,
) -> Indexer:
    """The index for the embedding model in use, loaded from the chunk store."""
    backend = make_backend(
        settings.retrieve_dense_backend,
        info.dimension,
        settings.retrieve_milvus_uri,
        settings.retrieve_milvus_collection,
        settings.retrieve_faiss_index,
    )
    indexer = Indexer(settings, HybridIndex(backend, info.dimension), store, info.model)
    indexer.consumer = stream.consumer
    indexer.dead_letters = stream.dead_letters
    await indexer.load()
    return indexer


async def main() -> None:
    settings = RetrieveSettings()
    app = service_app("retrieve", settings, settings.retrieve_port, settings.retrieve_metrics_port)
    redis = redisutil.connect(settings.redis_url)
    embed_channel = clients.channel(settings.endpoint("embed"))
    embed_stub = embed_pb2_grpc.EmbedServiceStub(embed_channel)
    producer = make_producer(settings, "retrieve")
    loaded = asyncio.Event()
    local = settings.retrieve_query_embedder == "local"
    embedder = None
    if local:
        embedder = Embedder.from_settings(settings, threads=settings.retrieve_query_threads)
        encode = local_encoder(embedder)
    else:
        encode = remote_encoder(embed_stub, settings.rpc_timeout_s)
    servicer = RetrieveServicer(settings, QueryEmbedder(encode, settings.retrieve_query_cache))
    retrieve_pb2_grpc.add_RetrieveServiceServicer_to_server(servicer, app.server)
    store = ChunkStore(redis, settings.redis_prefix, settings.topic_embedded)
    # The stream is built now (its start hook must come after the index is loaded) and given
    # its handler once the index dimension is known.
    indexer: Indexer | None = None

    async def handle(records: list) -> None:  # type: ignore[type-arg]
        assert indexer is not None
        await indexer.handle(records)

    stream = embedded_stream(settings, handle, producer, redis, store)

    async def start() -> None:
        nonlocal indexer
        info = await index_model(settings, embedder, embed_stub)
        await producer.start()
        indexer = await open_indexer(settings, info, store, stream)
        servicer.attach(indexer)
        app.spawn(indexer.rebuild_bm25(), "bm25-rebuild")
        app.spawn(indexer.watch_redis(), "redis-watch")
        loaded.set()

    async def stop() -> None:
        await producer.flush()
        await producer.stop()
        await embed_channel.close(None)
        await redis.aclose()

    async def index_loaded() -> bool:
        return loaded.is_set()

    app.add_service(retrieve_pb2.DESCRIPTOR.services_by_name["RetrieveService"].full_name)
    app.on_start(start)
    app.on_stop(stop)
    attach_stream(app, stream, "indexer")
    app.add_check("redis", lambda: redisutil.ping(redis))
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    if not local:
        app.add_check("embed", lambda: clients.is_serving(embed_channel))
    app.add_check("index", index_loaded)
    await app.serve()
