"""``knowstream trace ID``: every record on the topics that carries the trace ``ID`` in its
``traceparent`` header (services/common/tracing.py), oldest first.

The scan is bounded: the last ``--last`` records of each partition of each topic (the dead-letter
topics included), and ``--scan-timeout`` seconds in all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError, Message

from knowstream.events.v1 import events_pb2
from services.common.kafka import all_topics
from services.common.settings import CommonSettings
from services.common.tracing import parse_traceparent, trace_of_record, valid_trace_id


def event_types(settings: CommonSettings) -> dict[str, type[Message]]:
    """What each topic holds, to say what a record is (dead-letter topics hold DeadLetters)."""
    s = settings
    return {
        s.topic_chunks: events_pb2.KnowledgeEvent,
        s.topic_embedded: events_pb2.KnowledgeEvent,
        s.topic_inference: events_pb2.InferenceEvent,
        s.topic_shadow: events_pb2.ShadowPairEvent,
        s.topic_feedback: events_pb2.FeedbackEvent,
        s.topic_adapters: events_pb2.AdapterEvent,
        s.topic_drift_windows: events_pb2.DriftWindow,
        s.topic_retrain: events_pb2.RetrainRequested,
        s.topic_knowledge_gaps: events_pb2.KnowledgeGap,
        s.topic_training: events_pb2.TrainingEvent,
        s.topic_audit: events_pb2.AuditEvent,
    } | {s.dlq(t): events_pb2.DeadLetter for t in all_topics(s) if not t.endswith(s.dlq_suffix)}


def summary(kind: type[Message] | None, value: bytes | None) -> str:
    if kind is None or not value:
        return ""
    try:
        event: Any = kind.FromString(value)
    except DecodeError:
        return "(undecodable)"
    if isinstance(event, events_pb2.KnowledgeEvent):
        which = event.WhichOneof("kind") or "?"
        inner = getattr(event, which, None)
        chunk = getattr(inner, "chunk", inner)
        return f"{which} {getattr(chunk, 'chunk_id', '') or getattr(chunk, 'doc_id', '')}"
    for field in ("request_id", "method", "reason", "kind", "job_id"):
        if getattr(event, field, ""):
            return f"{kind.__name__} {field}={getattr(event, field)}"
    return kind.__name__


def read_records(
    settings: CommonSettings, topics: Iterable[str], last: int | None, timeout_s: float
) -> Iterator[Any]:
    """The records of every partition of ``topics`` up to the end offsets they had when the read
    began: the last ``last`` of each partition, or all of them (``None``); ``timeout_s`` in all."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, group_id=None
    )
    try:
        parts = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not parts:
            return
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        if last is None:
            consumer.seek_to_beginning(*parts)  # where the log starts now, retention allowing
        else:
            for tp in parts:
                consumer.seek(tp, max(0, ends[tp] - last))
        waiting = {tp for tp in parts if ends[tp] > 0}
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=2000).values():
                yield from records
            # End offsets are a lower bound on the embedded broker: read at least up to them.
            waiting = {tp for tp in waiting if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close()


def scan(
    settings: CommonSettings, trace_id: str, last: int, timeout_s: float
) -> list[dict[str, Any]]:
    """The records of ``trace_id`` among the last ``last`` of every partition of every topic."""
    types = event_types(settings)
    found = [
        _row(r, types.get(r.topic))
        for r in read_records(settings, all_topics(settings), last, timeout_s)
        if trace_of_record(r) == trace_id
    ]
    return sorted(found, key=lambda row: (row["timestamp_ms"], row["topic"], row["offset"]))


def _row(record: Any, kind: type[Message] | None) -> dict[str, Any]:
    return {
        "timestamp_ms": record.timestamp,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": (record.key or b"").decode("utf-8", "replace"),
        "event": summary(kind, record.value),
    }


def cmd_trace(args: argparse.Namespace, settings: CommonSettings) -> int:
    parsed = parse_traceparent(args.trace_id)  # a whole traceparent is accepted too
    trace_id = parsed.trace_id if parsed else args.trace_id.lower()
    if not valid_trace_id(trace_id):
        print(f"not a trace id (32 hex digits) or traceparent: {args.trace_id!r}", file=sys.stderr)
        return 2
    rows = scan(settings, trace_id, args.last, args.scan_timeout)
    if args.json:
        print(json.dumps({"trace_id": trace_id, "records": rows}))
        return 0 if rows else 1
    for r in rows:
        at = datetime.fromtimestamp(r["timestamp_ms"] / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]
        print(f"{at}  {r['topic']}[{r['partition']}]@{r['offset']}  key={r['key']}  {r['event']}")
    print(f"({len(rows)} records of trace {trace_id})", file=sys.stderr)
    return 0 if rows else 1


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "trace", help="every event of one trace (by the traceparent header on the topics)"
    )
    p.add_argument("trace_id", help="trace id (32 hex digits) or a whole traceparent")
    p.add_argument("--last", type=int, default=10_000, help="records read per partition")
    p.add_argument("--scan-timeout", type=float, default=30, help="seconds for the whole scan")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_trace)
