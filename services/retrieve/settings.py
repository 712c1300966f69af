from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class RetrieveSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    retrieve_group: str = Field(
        "ks-retrieve", description="Consumer group of the indexer (embedded chunks)."
    )
    retrieve_dense_backend: Literal["faiss", "milvus"] = Field(
        "faiss", description="Dense index: FAISS in process, or Milvus (KS_RETRIEVE_MILVUS_URI)."
    )
    retrieve_faiss_index: Literal["hnsw", "flat"] = Field(
        "hnsw", description="FAISS index kind: HNSW (approximate) or flat (exact)."
    )
    retrieve_milvus_uri: str = Field(
        ".run/milvus.db",
        description=(
            "Milvus URI: a file path runs Milvus Lite in process; http://host:19530 a Milvus "
            "server."
        ),
    )
    retrieve_milvus_collection: str = Field(
        "ks_chunks", description="Milvus collection of the chunk vectors."
    )
    retrieve_default_k: int = Field(10, ge=1, description="Results of a Search that sets no k.")
    retrieve_max_k: int = Field(100, ge=1, description="Largest k of a Search; above it refused.")
    retrieve_candidates: int = Field(
        50, ge=1, description="Candidates taken from each retriever before fusion."
    )
    # Chosen on PubMedQA by bench.retrieval --sweep.
    retrieve_dense_weight: float = Field(
        2.0, ge=0, description="Weight of the dense ranking in weighted RRF."
    )
    retrieve_bm25_weight: float = Field(
        1.0, ge=0, description="Weight of the BM25 ranking in weighted RRF."
    )
    retrieve_rrf_k: int = Field(
        60, ge=1, description="k of reciprocal rank fusion: a ranking adds weight / (k + rank)."
    )
    retrieve_bm25_rebuild_s: float = Field(
        0.5,
        ge=0,
        description=(
            "Debounce of BM25 rebuilds, in seconds: new chunks are searchable densely at once "
            "and through BM25 after the next rebuild (longer while a large corpus loads)."
        ),
    )
    retrieve_query_cache: int = Field(
        1024, ge=0, description="Query embeddings kept in an LRU cache; 0 = no cache."
    )
    # "local" saves the network hop: 4-5 ms instead of ~15 ms per query on a 2-core CPU.
    retrieve_query_embedder: Literal["local", "remote"] = Field(
        "local",
        description=(
            "Where queries are embedded: in this process with the same model and runtime, or "
            "by the embed service's Embed."
        ),
    )
    # One query: p50 9-10 ms with 2 threads, 12 ms with 1.
    retrieve_query_threads: int = Field(2, ge=1, description="Threads of the local query encoder.")
    retrieve_poll_records: int = Field(
        512, ge=1, description="Most embedded chunks the indexer takes per poll."
    )
