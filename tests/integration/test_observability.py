"""Observability on the real stack: a real Prometheus scrapes every service, the dashboard's
queries run on it, and a client's traceparent is found on every event its ingest and its Ask
caused (`knowstream trace`)."""

from __future__ import annotations

import json

import pytest

from deploy import prometheus
from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.cli.main import main
from services.common import tracing
from services.common.clients import sync_channel
from tests.integration.conftest import read_events
from tests.utils.dashboard import dashboard_queries

pytestmark = pytest.mark.integration


def test_prometheus_scrapes_every_service_and_runs_the_dashboard(stack):
    # Installs Debian's package when it is missing, and fails with apt-get's words if it cannot.
    stack.start_prometheus()
    try:
        components = [n for n in stack.services if stack.metrics_port(n)] + ["triton"]
        assert {"ingest", "embed", "retrieve", "infer", "monitor", "trainer"} <= set(components)
        prometheus.wait_scraped(stack.settings, components, timeout_s=60)
        for expr in dashboard_queries():
            prometheus.query(stack.settings, expr)  # raises unless Prometheus accepts it
    finally:
        stack.stop("prometheus")


def test_a_client_traceparent_is_on_every_event_it_caused(stack, tmp_path, capsys):
    s = stack.settings
    trace = tracing.new_trace()
    doc = tmp_path / "traced.jsonl"
    doc_id = f"traced-{trace.trace_id[:8]}"
    text = "Traced document: the zebrafish lateral line regenerates hair cells within days."
    doc.write_text(
        json.dumps({"id": doc_id, "text": text, "domain": "tracing"}) + "\n", encoding="utf-8"
    )
    # The CLI returns once what it sent is searchable (it waits on GetIndexing).
    assert main(["--traceparent", trace.header(), "ingest", str(doc), "--wait", "120"]) == 0
    token = tracing.use(trace)
    try:
        with sync_channel(s.address(s.infer_port)) as chan:
            reply = infer_pb2_grpc.InferServiceStub(chan).Ask(
                infer_pb2.AskRequest(question="What regenerates hair cells?", k=2, max_tokens=8),
                timeout=120,
            )
    finally:
        tracing.restore(token)
    try:
        chunk = read_events(
            s, s.topic_chunks, events_pb2.KnowledgeEvent, lambda e: e.chunk.doc_id == doc_id
        )
        embedded = read_events(
            s,
            s.topic_embedded,
            events_pb2.KnowledgeEvent,
            lambda e: e.embedded.chunk.doc_id == doc_id,
        )
        answer = read_events(
            s,
            s.topic_inference,
            events_pb2.InferenceEvent,
            lambda e: e.request_id == reply.request_id,
        )
        assert chunk.chunk.header.trace_id == trace.trace_id
        assert embedded.embedded.header.trace_id == trace.trace_id
        assert answer.header.trace_id == trace.trace_id
        capsys.readouterr()
        assert main(["trace", trace.trace_id, "--json"]) == 0
        records = json.loads(capsys.readouterr().out)["records"]
        topics = {r["topic"] for r in records}
        assert {s.topic_chunks, s.topic_embedded, s.topic_inference} <= topics, records
    finally:
        with sync_channel(s.address(s.ingest_port)) as chan:
            ingest_pb2_grpc.IngestServiceStub(chan).DeleteDocument(
                ingest_pb2.DeleteDocumentRequest(id=doc_id), timeout=30
            )
