from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class RetrieveSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    retrieve_group: str = "ks-retrieve"
    retrieve_dense_backend: Literal["faiss", "milvus"] = "faiss"
    retrieve_faiss_index: Literal["hnsw", "flat"] = "hnsw"
    # Milvus URI: a file path runs Milvus Lite in-process; http://host:19530 a Milvus server.
    retrieve_milvus_uri: str = ".run/milvus.db"
    retrieve_milvus_collection: str = "ks_chunks"
    retrieve_default_k: int = Field(10, ge=1)
    retrieve_max_k: int = Field(100, ge=1)
    # Candidates taken from each retriever before fusion.
    retrieve_candidates: int = Field(50, ge=1)
    # Weights of weighted RRF (dense, bm25); chosen on PubMedQA by bench.retrieval --sweep.
    retrieve_dense_weight: float = Field(2.0, ge=0)
    retrieve_bm25_weight: float = Field(1.0, ge=0)
    retrieve_rrf_k: int = Field(60, ge=1)
    # Debounce of BM25 rebuilds: new chunks are searchable densely at once and through BM25
    # after the next rebuild.
    retrieve_bm25_rebuild_s: float = Field(0.5, ge=0)
    retrieve_query_cache: int = Field(1024, ge=0)
    # Where queries are embedded: "local" runs the same model and runtime in this process (no
    # network hop: 4-5 ms instead of ~15 ms per query on this CPU); "remote" calls the embed
    # service's Embed.
    retrieve_query_embedder: Literal["local", "remote"] = "local"
    # Threads of the local query encoder (one query: p50 9-10 ms with 2 threads, 12 ms with 1).
    retrieve_query_threads: int = Field(2, ge=1)
    retrieve_poll_records: int = Field(512, ge=1)
    retrieve_metrics_port: int = 0
