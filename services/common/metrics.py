"""Prometheus metrics shared by all services. Each service exposes them on its own port."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RPC_LATENCY = Histogram(
    "ks_rpc_latency_seconds",
    "gRPC handler latency",
    ["service", "method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS_CONSUMED = Counter(
    "ks_events_consumed_total", "Kafka records consumed", ["service", "topic"]
)
EVENTS_PRODUCED = Counter(
    "ks_events_produced_total", "Kafka records produced", ["service", "topic"]
)
DEAD_LETTERS = Counter(
    "ks_dead_letters_total", "Records sent to a dead-letter topic", ["service", "topic"]
)
# Consumer plumbing (services/common/consumer.py). Lag is measured against the broker's end
# offset, which the embedded broker under-reports after batched writes: a lower bound.
CONSUMER_LAG = Gauge(
    "ks_consumer_lag_records",
    "Records in a partition after the last one processed (a lower bound)",
    ["service", "group", "topic", "partition"],
)
CONSUMER_STALLED = Gauge(
    "ks_consumer_stalled",
    "1 while records wait in a partition and none has been processed for the stall timeout",
    ["service", "group", "topic", "partition"],
)
LOG_RESETS = Counter(
    "ks_log_resets_total",
    "Partitions found reset (shorter than, or different from, what was consumed)",
    ["service", "topic"],
)
OUTBOX_PENDING = Gauge(
    "ks_ingest_outbox_pending", "Accepted versions and deletions not yet applied by retrieve"
)
REPUBLISHED = Counter(
    "ks_ingest_republished_total",
    "Versions and deletions the reconciler published again",
    ["reason"],
)
RECORD_RETRIES = Counter(
    "ks_record_retries_total",
    "Failed attempts at handling records that were tried again",
    ["service", "topic", "kind"],
)

# The figures users watch (deploy/grafana/knowstream.json plots them).
INGEST_SEARCHABLE_LAG = Histogram(
    "ks_ingest_searchable_lag_seconds",
    "From ingest's ack of a document version to retrieve making it searchable",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
ASK_LATENCY = Histogram(
    "ks_ask_latency_seconds",
    "Ask end to end (retrieval, prompt, generation), by the adapter that answered and the route",
    ["adapter", "route"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
DRIFT_P_VALUE = Gauge("ks_drift_p_value", "Permutation p-value of the last drift window's MMD")
DRIFT_MMD2 = Gauge("ks_drift_mmd2", "MMD² of the last drift window against the reference")
DRIFT_WINDOW = Gauge("ks_drift_window_index", "Index of the last drift window")
SHADOW_AGREEMENT = Histogram(
    "ks_shadow_agreement",
    "Agreement of a mirrored shadow answer with the live one (0-1)",
    ["shadow_adapter"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
TRAINING_LOSS = Gauge("ks_training_loss", "Training loss at the last progress report", ["mode"])
TRAINING_TOKENS_PER_S = Gauge(
    "ks_training_tokens_per_second", "Training throughput at the last progress report", ["mode"]
)
GATE_RESULTS = Counter("ks_gate_results_total", "Evaluation gate decisions", ["mode", "result"])


def start_metrics_server(port: int, host: str) -> None:
    """Serve /metrics; port 0 disables it (the tests run many stacks side by side)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
