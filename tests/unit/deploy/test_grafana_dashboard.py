"""deploy/grafana/knowstream.json is a Grafana dashboard model whose queries name the metrics the
services export (the integration test runs every query on a real Prometheus)."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY

import services.common.metrics  # noqa: F401  (registers the metrics)
from tests.utils.dashboard import dashboard_model, dashboard_queries

SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def exported_names() -> set[str]:
    names = {"up"}
    for family in REGISTRY.collect():
        for suffix in SUFFIXES.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


def test_model_is_well_formed():
    model = dashboard_model()
    assert model["title"] and model["uid"] and isinstance(model["schemaVersion"], int)
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["type"] == "prometheus" and panel["targets"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs))
    assert any(v["type"] == "datasource" for v in model["templating"]["list"])


def test_queries_name_exported_metrics():
    known = exported_names()
    for expr in dashboard_queries():
        named = re.findall(r"\b(ks_[a-z0-9_]+|up)\b", expr)
        assert named, expr
        assert set(named) <= known, f"{expr}: {set(named) - known} not exported"


def test_the_figures_users_watch_are_plotted():
    text = " ".join(dashboard_queries())
    for metric in (
        "ks_ingest_searchable_lag_seconds",
        "ks_consumer_lag_records",
        "ks_ask_latency_seconds",
        "ks_drift_p_value",
        "ks_drift_mmd2",
        "ks_shadow_agreement",
        "ks_training_loss",
        "ks_training_tokens_per_second",
        "ks_gate_results_total",
    ):
        assert metric in text, metric
