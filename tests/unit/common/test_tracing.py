"""W3C traceparent: parsing, and propagation through the gRPC interceptors, Kafka headers and
the consumer plumbing (services/common/tracing.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from knowstream.events.v1 import events_pb2
from services.common import tracing
from services.common.clients import channel
from services.common.consumer import StreamConsumer
from services.common.grpcserver import ObservabilityInterceptor
from services.common.kafka import new_header
from services.common.settings import CommonSettings

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value",
    [
        PARENT,
        PARENT.encode(),
        f"01-{TRACE}-00f067aa0ba902b7-00-future-field",  # a later version may append fields
    ],
)
def test_parses_valid_traceparent(value):
    ctx = tracing.parse_traceparent(value)
    assert ctx is not None and ctx.trace_id == TRACE and ctx.span_id == "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"00-{TRACE.upper()}-00f067aa0ba902b7-01",  # upper-case hex
        f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",
        f"00-{TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE}-00f067aa0ba902b7-1",
    ],
)
def test_rejects_malformed_traceparent(value):
    assert tracing.parse_traceparent(value) is None


def test_child_keeps_trace_and_header_round_trips():
    ctx = tracing.new_trace()
    child = ctx.child()
    assert child.trace_id == ctx.trace_id and child.span_id != ctx.span_id
    assert tracing.parse_traceparent(child.header()) == child


def test_server_context_continues_the_caller_or_starts_a_trace():
    ctx = tracing.server_context([("traceparent", PARENT)])
    assert ctx.trace_id == TRACE and ctx.span_id != "00f067aa0ba902b7"
    assert tracing.server_context([("traceparent", "bad")]).trace_id != TRACE


def test_work_done_later_continues_the_trace_it_was_asked_under():
    outer = tracing.new_trace()
    token = tracing.use(outer)
    try:
        with tracing.continued(TRACE):  # a job stored with the trace of the call that made it
            assert tracing.current_trace_id() == TRACE
        assert tracing.current() == outer
        with tracing.continued(""):  # none recorded (an older job): the current trace goes on
            assert tracing.current() == outer
    finally:
        tracing.restore(token)


def test_outgoing_metadata_and_headers_follow_the_current_trace():
    assert tracing.outgoing_metadata([("a", "1")]) == [("a", "1")]  # no trace: nothing added
    assert tracing.kafka_headers() == []
    token = tracing.use(tracing.parse_traceparent(PARENT))
    try:
        out = dict(tracing.outgoing_metadata([("a", "1")]))
        assert tracing.parse_traceparent(out["traceparent"]).trace_id == TRACE
        # A traceparent the caller set is kept as it is.
        assert tracing.outgoing_metadata([("traceparent", "x")]) == [("traceparent", "x")]
        ((key, value),) = tracing.kafka_headers()
        assert key == "traceparent" and tracing.parse_traceparent(value).trace_id == TRACE
        other = "a" * 32
        assert tracing.parse_traceparent(tracing.kafka_headers(other)[0][1]).trace_id == other
        assert new_header("t").trace_id == TRACE
        assert new_header("t", other).trace_id == other
    finally:
        tracing.restore(token)
    assert new_header("t").trace_id == ""


def _record(trace_id: str) -> SimpleNamespace:
    headers = [("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())] if trace_id else []
    return SimpleNamespace(headers=headers, topic="t", partition=0, offset=0)


@pytest.mark.parametrize(
    ("traces", "seen"),
    [([TRACE, TRACE], TRACE), ([TRACE, "b" * 32], ""), ([TRACE, ""], ""), ([""], "")],
)
def test_consumer_handler_runs_on_its_records_trace(traces, seen):
    got = []

    async def handler(records):
        got.append(tracing.current_trace_id())

    stream = StreamConsumer.__new__(StreamConsumer)  # only the handling path is exercised
    stream.handlers = {"t": handler}
    stream.settings = CommonSettings()
    asyncio.run(stream._process("t", [_record(t) for t in traces]))
    assert got == [seen] and tracing.current() is None


def test_traceparent_crosses_a_grpc_call():
    seen: list = []
    asyncio.run(_call_twice(seen))
    assert seen[0].trace_id == TRACE and seen[0].span_id != "00f067aa0ba902b7"
    assert seen[1] is not None and seen[1].trace_id != TRACE


async def _call_twice(seen: list) -> None:

    async def echo(request: bytes, context) -> bytes:
        seen.append(tracing.current())
        return b""

    server = grpc.aio.server(interceptors=[ObservabilityInterceptor("test")])
    raw = {"request_deserializer": bytes, "response_serializer": bytes}
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo, **raw)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with channel(f"127.0.0.1:{port}", token="") as chan:
            call = chan.unary_unary("/t.T/Echo")
            token = tracing.use(tracing.parse_traceparent(PARENT))
            try:
                await call(b"", timeout=5)
            finally:
                tracing.restore(token)
            await call(b"", timeout=5)  # no trace on the client: the server starts one
    finally:
        await server.stop(0)


def test_embedded_chunk_keeps_the_chunk_trace():
    from services.embed.stream import process_batch

    chunk = events_pb2.ChunkEvent(header=new_header("ingest", TRACE), doc_id="d", chunk_id="d#1")
    value = events_pb2.KnowledgeEvent(chunk=chunk).SerializeToString()

    async def embed(texts):
        import numpy as np

        return np.zeros((len(texts), 2), dtype="float32")

    outputs, rejects = asyncio.run(process_batch([(b"d", value)], embed, "m"))
    assert not rejects and outputs[0][2] == TRACE
