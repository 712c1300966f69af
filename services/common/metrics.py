"""Prometheus metrics shared by all services. Each service exposes them on its own port."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

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


def start_metrics_server(port: int, host: str) -> None:
    """Serve /metrics; port 0 disables it (the tests run many stacks side by side)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
