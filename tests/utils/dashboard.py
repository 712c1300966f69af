"""The Grafana dashboard's queries (deploy/grafana/knowstream.json), for the tests that check
them: against the exported metric names (unit) and on a real Prometheus (integration)."""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "knowstream.json"


def dashboard_model() -> dict:  # type: ignore[type-arg]
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard_model()["panels"] for t in p.get("targets", [])]
