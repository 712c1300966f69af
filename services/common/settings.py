"""Settings shared by every service, read from the environment (prefix ``KS_``).

Each service extends :class:`CommonSettings` with its own knobs under its own prefix. Invalid
values fail at start-up, not on first use.

Over 400 lines only because it is one field definition after another: each field's description
is its documentation (README.md's settings reference is generated from it, ``make docs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.limits import LimitSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


# The embedded broker (Tansu 0.6) enforces no record limit of its own (records of 100 MiB were
# accepted and read back here); this is the limit the producers refuse above and the Kafka
# topics are configured with (max.message.bytes, deploy/k8s/validate.py).
MAX_RECORD_BYTES = 16 * 1024 * 1024


class CommonSettings(LimitSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address every service and component binds to.")
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        description=(
            "Kafka bootstrap servers (host:port, comma-separated); `make up` starts the embedded "
            "broker (Tansu) there when nothing answers."
        ),
    )
    broker_storage: Literal["disk", "memory"] = Field(
        "disk",
        description=(
            "Where the embedded broker `make up` starts keeps its log: `disk` = an S3-compatible "
            "store on local disk under <run dir>/broker (deploy/objectstore.py), so a broker "
            "restart keeps every record and committed offset; `memory` = nothing kept (a "
            "restart empties every topic; the services then re-read and ingest re-publishes)."
        ),
    )
    broker_store_port: int = Field(
        9094, ge=1, le=65535, description="Port of the embedded broker's store (on 127.0.0.1)."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6390/0",
        description=(
            "Redis holding all durable state. On 127.0.0.1 with nothing answering, `make up` "
            "starts its own there (append-only file and snapshots under <run dir>/redis); "
            "another Redis answering there is used only when KS_REDIS_URL is set on purpose."
        ),
    )
    redis_prefix: str = Field(
        "ks",
        description=(
            "Prefix of every Redis key, so that several stacks (or the tests) can share one "
            "Redis server."
        ),
    )

    ingest_port: int = Field(50051, description="gRPC port of the ingest service.")
    embed_port: int = Field(
        50052,
        description="gRPC port of the embed service (`make up`'s extra workers: + 100 each).",
    )
    retrieve_port: int = Field(50053, description="gRPC port of the retrieve service.")
    infer_port: int = Field(
        50054, description="gRPC port of the infer service (InferService, AdapterAdminService)."
    )
    monitor_port: int = Field(50055, description="gRPC port of the drift monitor.")
    trainer_port: int = Field(50056, description="gRPC port of the trainer.")
    openai_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description=(
            "Port of the OpenAI-compatible HTTP API (services/openai_api); 0 = `make up` does "
            "not start it."
        ),
    )
    # Triton's own endpoints (`make up` starts Triton on them).
    triton_grpc_port: int = Field(
        8001,
        description="Triton's gRPC port, where the infer service and the trainer call the LLM.",
    )
    triton_http_port: int = Field(
        8000, description="Triton's HTTP port (readiness, model-repository API)."
    )
    triton_metrics_port: int = Field(8002, description="Triton's Prometheus /metrics port.")
    # KS_HOST is also the bind address, so services that run apart (docker-compose, k8s) need
    # the other services' names.
    embed_host: str = Field(
        "",
        description=(
            "Host where retrieve, the monitor and the OpenAI API reach the embed service; "
            "empty = KS_HOST (in docker-compose: the container name)."
        ),
    )
    retrieve_host: str = Field(
        "",
        description=(
            "Host where infer and the trainer reach the retrieve service; empty = KS_HOST."
        ),
    )
    triton_host: str = Field(
        "", description="Host where infer and the trainer reach Triton; empty = KS_HOST."
    )
    infer_host: str = Field(
        "",
        description=(
            "Host where the trainer, the OpenAI API and the CLI reach the infer service; "
            "empty = KS_HOST."
        ),
    )
    # Only clients reach these (the CLI, benchmarks, the OpenAI front): no service calls them.
    ingest_host: str = Field(
        "", description="Host of the ingest service for clients; empty = KS_HOST."
    )
    monitor_host: str = Field(
        "", description="Host of the monitor service for clients; empty = KS_HOST."
    )
    trainer_host: str = Field(
        "", description="Host of the trainer service for clients; empty = KS_HOST."
    )
    triton_model: str = Field(
        "llm", description="Name of the LLM in Triton's model repository (deploy/triton)."
    )

    topic_raw_documents: str = Field(
        "ks.documents.raw",
        description="Topic of accepted raw documents (ingest's API and outside producers).",
    )
    topic_chunks: str = Field(
        "ks.chunks", description="Topic of document chunks, ingest's output and embed's input."
    )
    topic_embedded: str = Field(
        "ks.chunks.embedded",
        description="Topic of embedded chunks, embed's output and retrieve's index input.",
    )
    topic_inference: str = Field(
        "ks.inference",
        description="Serving events: one per answer (read by the monitor and the trainer).",
    )
    topic_shadow: str = Field(
        "ks.inference.shadow",
        description="Serving events: shadow pairs (live and candidate answer to one question).",
    )
    topic_feedback: str = Field("ks.feedback", description="Serving events: user feedback.")
    topic_adapters: str = Field(
        "ks.adapters", description="Adapter lifecycle events (registration, rollout changes)."
    )
    topic_drift_windows: str = Field(
        "ks.drift.windows", description="The drift monitor's statistics, one event per window."
    )
    topic_retrain: str = Field(
        "ks.retrain",
        description="Retrain requests (from the monitor, people or tools), read by the trainer.",
    )
    topic_knowledge_gaps: str = Field(
        "ks.knowledge.gaps",
        description="Knowledge gaps the monitor found (questions retrieval answers poorly).",
    )
    topic_training: str = Field(
        "ks.training", description="The trainer's job progress, gate results and rollout decisions."
    )
    topic_audit: str = Field(
        "ks.audit",
        description="Audit trail: one AuditEvent per admin RPC (who, what, when, result).",
    )
    dlq_suffix: str = Field(
        ".dlq",
        description="A topic that can receive bad data has <topic><suffix> as dead-letter topic.",
    )
    topic_partitions: int = Field(
        4,
        ge=1,
        le=256,
        description=(
            "Partitions of the knowledge and serving topics (created explicitly; dead-letter, "
            "drift, training and audit topics have 1)."
        ),
    )

    kafka_max_record_bytes: int = Field(
        MAX_RECORD_BYTES,
        ge=1024 * 1024,
        le=MAX_RECORD_BYTES,
        description=(
            "Largest record a producer sends (and a consumer fetches); at most the topics' "
            "max.message.bytes (16 MiB). A record above it can never be sent: publishers "
            "dead-letter it with the reason instead of retrying."
        ),
    )
    grpc_max_message_bytes: int = Field(
        MAX_RECORD_BYTES,
        ge=64 * 1024,
        description=(
            "Largest gRPC message every server and client sends or receives; at most "
            "KS_KAFKA_MAX_RECORD_BYTES, so what a service accepts it can also publish."
        ),
    )
    grpc_max_concurrent_rpcs: int = Field(
        256,
        ge=1,
        description=(
            "Load shedding: RPCs a server runs at once; beyond them it answers "
            "RESOURCE_EXHAUSTED at once instead of queueing."
        ),
    )

    # Consumer-group tuning. The embedded broker (Tansu) takes about half the session timeout to
    # complete a group join, so a short session timeout keeps restarts quick.
    kafka_session_timeout_ms: int = Field(
        10_000, ge=6_000, description="Consumer-group session timeout, in milliseconds."
    )
    kafka_heartbeat_interval_ms: int = Field(
        1_000, ge=100, description="Consumer-group heartbeat interval, in milliseconds."
    )

    # -- consumer plumbing (services/common/consumer.py) --------------------------------------
    stream_retries: int = Field(
        3,
        ge=0,
        description=(
            "Retries of a record whose handler fails with an error that is not a dependency "
            "being down; then it goes to the dead-letter topic with the error as the reason."
        ),
    )
    stream_retry_backoff_s: float = Field(
        0.5, gt=0, description="First pause between retries; doubles up to 30 s."
    )
    stream_reset_check_s: float = Field(
        5.0,
        gt=0,
        description=(
            "How often a consumer checks that the last record it processed is still in the log "
            "(a restarted memory-only broker starts every log again at 0); also on every "
            "partition assignment."
        ),
    )
    stream_stall_s: float = Field(
        120.0,
        gt=0,
        description=(
            "A partition with records waiting and none processed for this long is stalled: "
            "its service reports NOT_SERVING with the reason until it moves again."
        ),
    )
    stream_lag_interval_s: float = Field(
        5.0, gt=0, description="How often per-partition lag is measured and published."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severity logged."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines as JSON objects or as plain text."
    )
    shutdown_grace_s: float = Field(
        5.0,
        ge=0,
        description=(
            "On SIGTERM, seconds in-flight RPCs (and infer's background work) get to finish."
        ),
    )
    rpc_timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "Deadline of a call from one service to another (e.g. retrieve -> embed), in "
            "seconds; the trainer's slower calls use a multiple of it."
        ),
    )

    # -- observability (services/common/metrics.py, deploy/prometheus.py) ----------------------
    ingest_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Port of ingest's Prometheus /metrics; 0 = off."
    )
    embed_metrics_port: int = Field(
        9102,
        ge=0,
        le=65535,
        description="Port of embed's /metrics; 0 = off. Extra workers: + 100 per worker.",
    )
    retrieve_metrics_port: int = Field(
        9103, ge=0, le=65535, description="Port of retrieve's Prometheus /metrics; 0 = off."
    )
    infer_metrics_port: int = Field(
        9104, ge=0, le=65535, description="Port of infer's Prometheus /metrics; 0 = off."
    )
    monitor_metrics_port: int = Field(
        9105, ge=0, le=65535, description="Port of monitor's Prometheus /metrics; 0 = off."
    )
    trainer_metrics_port: int = Field(
        9106, ge=0, le=65535, description="Port of the trainer's Prometheus /metrics; 0 = off."
    )
    prometheus: bool = Field(
        False,
        description=(
            "`make up` also starts Prometheus (`make up PROMETHEUS=1`), installing Debian's "
            "`prometheus` package on first use, scraping every service and Triton."
        ),
    )
    prometheus_port: int = Field(9090, ge=1, le=65535, description="Prometheus's web/API port.")
    prometheus_scrape_s: float = Field(
        5.0, gt=0, le=300, description="How often Prometheus scrapes every /metrics endpoint."
    )

    cache_dir: Path = Field(
        REPO_ROOT / ".cache",
        description=(
            "Derived artefacts (exported ONNX graphs, converted weights, DeepSpeed's native "
            "ops); safe to delete."
        ),
    )

    embed_runtime: Literal["onnx", "torch"] = Field(
        "onnx",
        description=(
            "Runtime of the embedding model wherever it runs (embed workers, retrieve's query "
            "encoder): ONNX Runtime or torch."
        ),
    )
    embed_model: str = Field(
        "all-MiniLM-L6-v2",
        description="Embedding model: a name known to services.common.models or a local path.",
    )

    llm_model: str = Field(
        "SmolLM2-135M-Instruct",
        description="Causal LM served by Triton: a packaged model name or a local HF directory.",
    )
    adapter_dir: Path = Field(
        REPO_ROOT / ".run" / "adapters",
        description=(
            "Adapter store (safetensors under content-hash ids); the registry's metadata is in "
            "Redis."
        ),
    )
    rollout_shadow_share: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of live traffic mirrored to a candidate put in shadow without one.",
    )
    rollout_canary_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of callers routed to a candidate put in canary without one.",
    )
    llm_max_new_tokens: int = Field(
        512,
        ge=1,
        description="Largest max_tokens of a request; the infer service and the engine enforce it.",
    )

    run_dir: Path = Field(
        REPO_ROOT / ".run",
        description="Where `make up` keeps logs, pids, state and the generated tokens.json.",
    )

    # -- security (services/common/auth.py, authz.py, tls.py, importdir.py) -------------------
    auth: Literal["on", "off"] = Field(
        "on",
        description=(
            "Bearer tokens and roles on every gRPC service. Only an explicit KS_AUTH=off turns "
            "them off, and every service then logs a warning at start."
        ),
    )
    auth_tokens_file: Path | None = Field(
        None,
        description=(
            "JSON file of the accepted tokens ({'tokens': [{name, role, secret}]}); default "
            "<run dir>/tokens.json, which `make up` generates once (mode 0600)."
        ),
    )
    auth_tokens: SecretStr = Field(
        SecretStr(""),
        description="The same JSON inline (compose/k8s secrets); wins over the file when set.",
    )
    auth_service_token: str = Field(
        "service",
        description="Name of the token (in the token set) a service presents to other services.",
    )
    auth_client_token: str = Field(
        "admin",
        description="Name of the token clients (the CLI) present when KS_TOKEN is unset.",
    )
    token: SecretStr = Field(
        SecretStr(""),
        description="Clients only: the bearer secret to present (overrides the tokens file).",
    )
    triton_admin_key: SecretStr = Field(
        SecretStr(""),
        description=(
            "Value of the ks-triton-admin header Triton's model-repository and shared-memory "
            "APIs require; default: <run dir>/triton-admin.key, which `make up` generates."
        ),
    )
    tls_cert_file: Path | None = Field(
        None, description="Server certificate (PEM) of every gRPC server; unset = plaintext."
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="mTLS: servers require client certificates signed by this CA (PEM).",
    )
    tls_ca_file: Path | None = Field(
        None,
        description=(
            "Clients (CLI, service-to-service) connect with TLS and verify servers against this "
            "CA bundle (PEM); unset = plaintext."
        ),
    )
    tls_client_cert_file: Path | None = Field(
        None, description="mTLS: the certificate (PEM) clients present."
    )
    tls_client_key_file: Path | None = Field(
        None, description="mTLS: private key (PEM) of tls_client_cert_file."
    )
    tls_server_name: str = Field(
        "",
        description="Name clients check in server certificates instead of the host dialled.",
    )
    import_dir: Path | None = Field(
        None,
        description=(
            "The only directory server-side paths in requests may name (RegisterAdapter, "
            "Train data); default <run dir>/import."
        ),
    )
    adapter_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Largest adapter (config + weights, or its tar) accepted by upload or import.",
    )

    @model_validator(mode="after")
    def _pairs(self) -> CommonSettings:
        for cert, key in (
            ("tls_cert_file", "tls_key_file"),
            ("tls_client_cert_file", "tls_client_key_file"),
        ):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"KS_{cert.upper()} and KS_{key.upper()} go together")
        if self.grpc_max_message_bytes > self.kafka_max_record_bytes:
            raise ValueError(
                f"KS_GRPC_MAX_MESSAGE_BYTES ({self.grpc_max_message_bytes}) must be at most "
                f"KS_KAFKA_MAX_RECORD_BYTES ({self.kafka_max_record_bytes})"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("KS_TLS_CLIENT_CA_FILE (mTLS) needs KS_TLS_CERT_FILE and its key")
        return self

    def tokens_file(self) -> Path:
        return self.auth_tokens_file or self.run_dir / "tokens.json"

    def import_root(self) -> Path:
        return self.import_dir or self.run_dir / "import"

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
