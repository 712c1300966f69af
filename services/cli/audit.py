"""``knowstream audit``: the audit trail (AuditEvents on ``ks.audit``), oldest first."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError

from knowstream.events.v1 import events_pb2
from services.common.settings import CommonSettings


def read_audit(settings: CommonSettings, limit: int, timeout_ms: int = 2000) -> list[Any]:
    """The last ``limit`` AuditEvents of the topic (read from its start: it has one partition
    and a retention the operator sets)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=timeout_ms,
    )
    try:
        partitions = consumer.partitions_for_topic(settings.topic_audit) or set()
        tps = [TopicPartition(settings.topic_audit, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        events = []
        for message in consumer:
            try:
                events.append(events_pb2.AuditEvent.FromString(message.value))
            except DecodeError:
                continue  # not ours: anyone who can write the topic can write garbage
        events.sort(key=lambda e: e.started_at_ms)
        return events[-limit:] if limit else events
    finally:
        consumer.close()


def event_dict(e: Any) -> dict[str, Any]:
    return {
        "time": datetime.fromtimestamp(e.started_at_ms / 1000, UTC).isoformat(),
        "who": e.who,
        "role": e.role,
        "method": e.method,
        "service": e.service,
        "code": e.code,
        "details": e.details,
        "request": e.request,
        "duration_ms": round(e.duration_ms, 1),
        "peer": e.peer,
    }


def cmd_audit(args: argparse.Namespace, settings: CommonSettings) -> int:
    try:
        events = read_audit(settings, 0)
    except Exception as exc:  # the broker down or unreachable
        print(f"audit failed: cannot read {settings.topic_audit}: {exc}", file=sys.stderr)
        return 1
    if args.who:
        events = [e for e in events if e.who == args.who]
    events = events[-args.limit :] if args.limit else events
    for e in events:
        d = event_dict(e)
        if args.json:
            print(json.dumps(d))
        else:
            method = d["method"].rsplit(".", 1)[-1]
            who = d["who"] or "(no valid token)"
            print(f"{d['time'][:23]}  {who:<12} {d['code']:<18} {method}  {d['request'][:80]}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("audit", help="the audit trail of admin RPCs (who, what, when, result)")
    p.add_argument("--limit", type=int, default=50, help="the newest N events (0 = all)")
    p.add_argument("--who", help="only this token name's calls")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_audit)
