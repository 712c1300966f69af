"""The scrape configuration `make up PROMETHEUS=1` writes (deploy/prometheus.py) and the metrics
ports the stack gives its services."""

from __future__ import annotations

import os

import pytest
import yaml

from deploy import prometheus
from deploy.stack import Stack


@pytest.fixture(autouse=True)
def no_ks_environment(monkeypatch):
    # A full run's integration stack exports its own ports (KS_*_METRICS_PORT among them).
    for key in [k for k in os.environ if k.startswith("KS_")]:
        monkeypatch.delenv(key)


def test_every_service_is_scraped_on_its_default_port(tmp_path):
    stack = Stack(tmp_path, {"KS_EMBED_WORKERS": "2", "KS_OPENAI_PORT": "0"})
    config = yaml.safe_load(prometheus.write_config(stack).read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    targets = {c["labels"]["component"]: c["targets"] for c in job["static_configs"]}
    assert targets == {
        "embed": ["127.0.0.1:9102"],
        "embed-2": ["127.0.0.1:9202"],  # a second worker: + 100, like its gRPC port
        "retrieve": ["127.0.0.1:9103"],
        "ingest": ["127.0.0.1:9101"],
        "infer": ["127.0.0.1:9104"],
        "monitor": ["127.0.0.1:9105"],
        "trainer": ["127.0.0.1:9106"],
        "triton": ["127.0.0.1:8002"],
    }
    assert config["global"]["scrape_interval"] == "5s"
    assert (tmp_path / "prometheus" / "prometheus.yml").exists()


def test_a_service_with_metrics_off_is_not_scraped(tmp_path):
    stack = Stack(tmp_path, {"KS_INGEST_METRICS_PORT": "0", "KS_PROMETHEUS_SCRAPE_S": "1"})
    assert stack.metrics_port("ingest") == 0
    components = {c["labels"]["component"] for c in prometheus.scrape_targets(stack)}
    assert "ingest" not in components and "retrieve" in components
    cmd = prometheus.command(stack, "/usr/bin/prometheus")
    assert f"--storage.tsdb.path={tmp_path / 'prometheus' / 'data'}" in cmd
