"""Retrieve service: consumes embedded chunks into the hybrid index and serves Search."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from knowstream.embed.v1 import embed_pb2, embed_pb2_grpc
from knowstream.events.v1 import events_pb2
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common import clients, redisutil
from services.common.embedding import Embedder
from services.common.grpcserver import service_app
from services.common.kafka import (
    BadEvent,
    DeadLetterSink,
    make_consumer,
    make_producer,
    parse_knowledge_event,
)
from services.common.metrics import EVENTS_CONSUMED
from services.common.net import kafka_alive
from services.retrieve.dense import Filters, make_backend
from services.retrieve.index import FusionConfig, Hit, HybridIndex
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


class Indexer:
    """Applies embedded-chunk records to Redis (authoritative) and then to the in-memory index.

    On (re)assignment each partition is positioned at the offset stored in Redis with the data,
    not at the broker's committed offset, so a crash between the two never loses or repeats a
    record. Kafka commits are still made, for lag monitoring.
    """

    def __init__(
        self,
        settings: RetrieveSettings,
        index: HybridIndex,
        store: ChunkStore,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterSink,
        model: str,
    ):
        self.settings = settings
        self.index = index
        self.store = store
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.model = model
        self.pending: dict[str, events_pb2.EmbeddedChunk] = {}
        self.bm25_dirty = asyncio.Event()
        self.compacting = False
        self._compaction: asyncio.Future[None] | None = None

    async def load(self) -> None:
        start = time.perf_counter()
        self.index.clear()
        chunks = await self.store.load_active()
        for i in range(0, len(chunks), 1000):
            self.index.add(chunks[i : i + 1000])
        await asyncio.to_thread(self.index.lexical.rebuild)
        log.info(
            "index rebuilt from Redis",
            extra={
                "chunks": len(self.index),
                "documents": self.index.documents,
                "seconds": round(time.perf_counter() - start, 2),
            },
        )

    async def seek_to_stored(self, partitions: set[TopicPartition]) -> None:
        offsets = await self.store.offsets()
        ends = await self.consumer.end_offsets(list(partitions)) if partitions else {}
        for tp in partitions:
            stored = offsets.get(tp.partition)
            if stored is None:
                continue
            if stored > ends.get(tp, stored):
                # The log is shorter than what was consumed: the broker lost its data (the
                # embedded broker keeps nothing across a restart). Indexed chunks stay in Redis;
                # read the new log from its start.
                log.warning(
                    "partition %d ends at %d, below the stored offset %d: the log was "
                    "reset; reading it from the start",
                    tp.partition,
                    ends[tp],
                    stored,
                )
                await self.store.reset_offset(tp.partition)
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, stored)

    def _check(self, event: events_pb2.KnowledgeEvent) -> None:
        if event.WhichOneof("kind") == "embedded":
            embedded = event.embedded
            if embedded.model != self.model:
                raise BadEvent(
                    f"embedded with model {embedded.model!r}; this index uses {self.model!r}"
                )
            if len(embedded.vector) != self.index.dimension:
                raise BadEvent(
                    f"vector has {len(embedded.vector)} dimensions; the index has "
                    f"{self.index.dimension}"
                )
        elif event.WhichOneof("kind") != "deleted":
            raise BadEvent(f"unexpected {event.WhichOneof('kind')} event on the embedded topic")

    async def handle(self, tp: TopicPartition, records: list) -> None:  # type: ignore[type-arg]
        stored = (await self.store.offsets()).get(tp.partition, -1)
        if records and stored > records[-1].offset + 1 and stored > await self._end(tp):
            await self.seek_to_stored({tp})  # log reset while assigned
            return
        good: list[tuple[int, int, events_pb2.KnowledgeEvent]] = []
        for record in records:
            if record.offset < stored:
                continue  # already applied before a restart or rebalance
            try:
                event = parse_knowledge_event(record.value)
                self._check(event)
            except BadEvent as exc:
                # Flush what came before, so offsets stay in order.
                await self._apply(good)
                good = []
                await self.dead_letters.send_record(record, str(exc))
                await self.store.advance(tp.partition, record.offset)
                continue
            good.append((tp.partition, record.offset, event))
        await self._apply(good)
        await self.consumer.commit({tp: records[-1].offset + 1})

    async def _end(self, tp: TopicPartition) -> int:
        return int((await self.consumer.end_offsets([tp]))[tp])

    async def _apply(self, good: list[tuple[int, int, events_pb2.KnowledgeEvent]]) -> None:
        if not good:
            return
        for _, _, event in good:
            if event.WhichOneof("kind") == "embedded":
                self.pending[event.embedded.chunk.chunk_id] = event.embedded
        for applied in await self.store.apply(good):
            if applied.removed:
                self.index.remove(list(applied.removed))
                for chunk_id in applied.removed:
                    self.pending.pop(chunk_id, None)
                self.bm25_dirty.set()
            if applied.kind == "activated":
                await self._activate(applied.doc_id, applied.version)
        if self.index.needs_compaction() and not self.compacting:
            self.compacting = True
            self._compaction = asyncio.ensure_future(self._compact())

    async def _compact(self) -> None:
        start = time.perf_counter()
        try:
            await self.index.compact()
        finally:
            self.compacting = False
        log.info(
            "dense index compacted",
            extra={"chunks": len(self.index), "seconds": round(time.perf_counter() - start, 2)},
        )

    async def _activate(self, doc_id: str, version: str) -> None:
        prefix = f"{doc_id}#{version[:16]}#"
        chunks = [c for cid, c in self.pending.items() if cid.startswith(prefix)]
        expected = chunks[0].chunk.chunk_count if chunks else -1
        if len(chunks) != expected:
            chunks = await self.store.version_chunks(doc_id, version)  # arrived before a restart
        for c in chunks:
            self.pending.pop(c.chunk.chunk_id, None)
        self.index.add(chunks)
        self.bm25_dirty.set()

    async def run(self) -> None:
        while True:
            batches = await self.consumer.getmany(
                timeout_ms=200, max_records=self.settings.retrieve_poll_records
            )
            for tp, records in batches.items():
                EVENTS_CONSUMED.labels("retrieve", tp.topic).inc(len(records))
                await self.handle(tp, records)

    async def rebuild_bm25(self) -> None:
        while True:
            await self.bm25_dirty.wait()
            self.bm25_dirty.clear()
            start = time.perf_counter()
            await asyncio.to_thread(self.index.lexical.rebuild)
            took = time.perf_counter() - start
            # A rebuild is O(corpus): while a large corpus is loading, pause in proportion so
            # rebuilds take at most a third of a core away from indexing.
            await asyncio.sleep(max(self.settings.retrieve_bm25_rebuild_s, 2 * took))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, indexer: Indexer):
        self.indexer = indexer

    async def on_partitions_revoked(self, revoked) -> None:  # type: ignore[no-untyped-def]
        pass

    async def on_partitions_assigned(self, assigned) -> None:  # type: ignore[no-untyped-def]
        await self.indexer.seek_to_stored(set(assigned))


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

    async def _ready(self, context: grpc.aio.ServicerContext) -> Indexer:
        if self._indexer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the index is still loading")
        assert self._indexer is not None
        return self._indexer

    async def Search(self, request, context):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        index = (await self._ready(context)).index
        query = request.query.strip()
        if not query:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query is empty")
        k = request.k or self.settings.retrieve_default_k
        if k > self.settings.retrieve_max_k:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"k={k} is above the limit of {self.settings.retrieve_max_k}",
            )
        mode = MODES.get(request.mode, "hybrid")
        f = request.filters
        filters = Filters(
            frozenset(d.lower() for d in f.domains), frozenset(f.sources), frozenset(f.doc_ids)
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
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"embed service unavailable: {exc.details()}"
                )
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
        reply.hits.extend(_hit_proto(h) for h in hits)
        reply.total_ms = (time.perf_counter() - start) * 1000
        return reply

    async def GetIndexStats(self, request, context):  # type: ignore[no-untyped-def]
        indexer = await self._ready(context)
        index = indexer.index
        return retrieve_pb2.IndexStats(
            chunks=len(index),
            documents=index.documents,
            pending_chunks=len(indexer.pending),
            bm25_lag_chunks=index.lexical.pending_changes,
            dense_backend=index.dense.name,
            offsets=await indexer.store.offsets(),
        )


def _hit_proto(hit: Hit) -> retrieve_pb2.SearchHit:
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
        metadata=c.metadata,
        content_hash=c.content_hash,
        chunk_index=c.chunk_index,
        token_start=c.token_start,
        token_end=c.token_end,
        ingested_at_ms=c.ingested_at_ms,
    )


async def main() -> None:
    settings = RetrieveSettings()
    app = service_app("retrieve", settings, settings.retrieve_port, settings.retrieve_metrics_port)
    redis = redisutil.connect(settings.redis_url)
    embed_channel = clients.channel(settings.endpoint("embed"))
    embed_stub = embed_pb2_grpc.EmbedServiceStub(embed_channel)
    producer = make_producer(settings, "retrieve")
    consumer = make_consumer(
        settings, settings.retrieve_group, [], max_poll_records=settings.retrieve_poll_records
    )
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

    async def start() -> None:
        if embedder is not None:
            info = embed_pb2.ModelInfo(model=settings.embed_model, dimension=embedder.dimension)
        else:
            # The index dimension comes from the embed service's model: wait for it.
            while True:
                try:
                    info = await embed_stub.GetModelInfo(embed_pb2.GetModelInfoRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    log.info("waiting for the embed service")
                    await asyncio.sleep(1)
            if info.model != settings.embed_model:
                raise RuntimeError(
                    f"embed service runs {info.model!r}, retrieve expects {settings.embed_model!r}"
                )
        backend = make_backend(
            settings.retrieve_dense_backend,
            info.dimension,
            settings.retrieve_milvus_uri,
            settings.retrieve_milvus_collection,
            settings.retrieve_faiss_index,
        )
        index = HybridIndex(backend, info.dimension)
        store = ChunkStore(redis, settings.redis_prefix, settings.topic_embedded)
        await producer.start()
        indexer = Indexer(
            settings,
            index,
            store,
            consumer,
            DeadLetterSink(producer, settings, "retrieve"),
            info.model,
        )
        await indexer.load()
        servicer.attach(indexer)
        consumer.subscribe([settings.topic_embedded], listener=_Rebalance(indexer))
        await consumer.start()
        app.spawn(indexer.run(), "indexer")
        app.spawn(indexer.rebuild_bm25(), "bm25-rebuild")
        loaded.set()

    async def stop() -> None:
        await consumer.stop()
        await producer.flush()
        await producer.stop()
        await embed_channel.close(None)
        await redis.aclose()

    async def index_loaded() -> bool:
        return loaded.is_set()

    app.add_service(retrieve_pb2.DESCRIPTOR.services_by_name["RetrieveService"].full_name)
    app.on_start(start)
    app.on_stop(stop)
    app.add_check("redis", lambda: redisutil.ping(redis))
    app.add_check("kafka", lambda: kafka_alive(settings.kafka_bootstrap))
    if not local:
        app.add_check("embed", lambda: clients.is_serving(embed_channel))
    app.add_check("index", index_loaded)
    await app.serve()
