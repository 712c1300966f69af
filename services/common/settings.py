"""Settings shared by every service, read from the environment (prefix ``KS_``).

Each service extends :class:`CommonSettings` with its own knobs under its own prefix. Invalid
values fail at start-up, not on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address every service and component binds to.")
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Key prefix in Redis so that several stacks (or the tests) can share one Redis server.
    redis_prefix: str = "ks"

    ingest_port: int = 50051
    embed_port: int = 50052
    retrieve_port: int = 50053
    infer_port: int = 50054
    monitor_port: int = 50055
    trainer_port: int = 50056
    # Triton's own endpoints (started by the stack; the infer service talks gRPC to it).
    triton_grpc_port: int = 8001
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002
    # Where services reach each other when it is not KS_HOST (which is also the bind address):
    # in docker-compose, the container names.
    embed_host: str = ""
    retrieve_host: str = ""
    triton_host: str = ""
    infer_host: str = ""
    # Name of the LLM in Triton's model repository (deploy/triton).
    triton_model: str = "llm"

    topic_raw_documents: str = "ks.documents.raw"
    topic_chunks: str = "ks.chunks"
    topic_embedded: str = "ks.chunks.embedded"
    # Serving events: every answer, shadow pairs, user feedback, adapter lifecycle.
    topic_inference: str = "ks.inference"
    topic_shadow: str = "ks.inference.shadow"
    topic_feedback: str = "ks.feedback"
    topic_adapters: str = "ks.adapters"
    # Drift monitor: per-window statistics, and its decisions (retrain requests feed the trainer).
    topic_drift_windows: str = "ks.drift.windows"
    topic_retrain: str = "ks.retrain"
    topic_knowledge_gaps: str = "ks.knowledge.gaps"
    # Trainer: job progress, gate results and rollout decisions.
    topic_training: str = "ks.training"
    # Every topic that can receive bad data has "<topic><suffix>" as its dead-letter topic.
    dlq_suffix: str = ".dlq"
    topic_partitions: int = Field(4, ge=1, le=256)

    # Consumer-group tuning. The embedded broker (Tansu) takes about half the session timeout to
    # complete a group join, so a short session timeout keeps restarts quick.
    kafka_session_timeout_ms: int = Field(10_000, ge=6_000)
    kafka_heartbeat_interval_ms: int = Field(1_000, ge=100)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    shutdown_grace_s: float = Field(5.0, ge=0)
    # Deadline for calls from one service to another (e.g. retrieve -> embed).
    rpc_timeout_s: float = Field(10.0, gt=0)

    # Derived artefacts (exported ONNX graphs, converted weights); safe to delete.
    cache_dir: Path = REPO_ROOT / ".cache"

    # Runtime of the embedding model wherever it runs (embed workers, retrieve's query encoder).
    embed_runtime: Literal["onnx", "torch"] = "onnx"
    embed_model: str = Field(
        "all-MiniLM-L6-v2",
        description="Embedding model: a name known to services.common.models or a local path.",
    )

    llm_model: str = Field(
        "SmolLM2-135M-Instruct",
        description="Causal LM served by Triton: a packaged model name or a local HF directory.",
    )
    # Adapter store (safetensors under content-hash ids); the registry's metadata is in Redis.
    adapter_dir: Path = REPO_ROOT / ".run" / "adapters"
    # Shares used when a candidate is put in shadow or canary without naming one.
    rollout_shadow_share: float = Field(1.0, ge=0, le=1)
    rollout_canary_share: float = Field(0.1, ge=0, le=1)
    # Upper bound of max_new_tokens, enforced by the infer service and by the engine.
    llm_max_new_tokens: int = Field(512, ge=1)

    def dlq(self, topic: str) -> str:
        return f"{topic}{self.dlq_suffix}"

    def address(self, port: int) -> str:
        return f"{self.host}:{port}"

    def endpoint(self, service: str) -> str:
        """Address of another service (embed, retrieve, infer, triton) for a client in a
        service."""
        port = getattr(self, "triton_grpc_port" if service == "triton" else f"{service}_port")
        return f"{getattr(self, f'{service}_host') or self.host}:{port}"

    def key(self, *parts: str) -> str:
        return ":".join((self.redis_prefix, *parts))
