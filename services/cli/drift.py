"""``knowstream drift ...``: the monitor's status, events, reference and report, and the same
detector over files, offline (``replay``)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from knowstream.events.v1 import events_pb2
from knowstream.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.cli import stubs
from services.cli.rpc import rpc_failed
from services.common.settings import CommonSettings
from services.monitor.settings import MonitorSettings


def cmd_replay(args: argparse.Namespace, _settings: object) -> int:
    from services.monitor.replay import embed_texts, read_texts, windows
    from services.monitor.windowing import build_reference

    settings = MonitorSettings()
    try:
        ref_texts = read_texts(Path(args.reference))
        stream_texts = read_texts(Path(args.stream))
    except (OSError, ValueError) as exc:
        print(f"drift replay: {exc}", file=sys.stderr)
        return 2
    size = args.window or settings.monitor_window
    step = args.step or settings.monitor_step or size
    if len(stream_texts) < size:
        print(
            f"drift replay: the stream has {len(stream_texts)} lines, fewer than one window "
            f"({size})",
            file=sys.stderr,
        )
        return 2
    embeddings = embed_texts(ref_texts + stream_texts, settings)
    try:
        _, reference = build_reference(embeddings[: len(ref_texts)], ref_texts, settings)
    except ValueError as exc:
        print(f"drift replay: {exc}", file=sys.stderr)
        return 2
    first = None
    count = 0
    for window in windows(
        reference, embeddings[len(ref_texts) :], stream_texts, settings, size, step
    ):
        count += 1
        if window.record.drift and first is None:
            first = window.end
        if args.json:
            print(json.dumps(window.as_json()))
        else:
            w = window.as_json()
            mark = "DRIFT" if w["drift"] else "-"
            print(
                f"window {w['window']:>3} [{w['start']}, {w['end']}): mmd2={w['mmd2']:.5f} "
                f"p={w['p_value']:.3f} kl_topics={w['kl_topics']:.3f} "
                f"kl_terms={w['kl_terms']:.3f} {mark}"
            )
    summary = {"first_drift_end": first, "windows": count}
    print(json.dumps(summary) if args.json else f"first drift ends at {first}; {count} windows")
    return 0


def _monitor(settings: CommonSettings) -> monitor_pb2_grpc.MonitorServiceStub:
    return stubs.monitor(settings)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def cmd_status(args: argparse.Namespace, settings: CommonSettings) -> int:
    try:
        status = _monitor(settings).GetDriftStatus(
            monitor_pb2.GetDriftStatusRequest(windows=args.windows), timeout=args.timeout
        )
    except grpc.RpcError as exc:
        return rpc_failed("drift status", exc)
    if args.json:
        out = json_format.MessageToDict(
            status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(out))
        return 0
    s = status.settings
    if status.HasField("reference"):
        r = status.reference
        print(
            f"reference {r.id}: {r.size} questions from {r.source} ({r.description or '-'}), "
            f"{r.topics} topics, σ²={r.sigma2:.4f}, set {_when(r.created_ms)}"
        )
    else:
        print("reference: none yet (built from the first questions unless that is off)")
    print(
        f"window {s.window} (step {s.step}), drift when p < {s.p_value:g}"
        + (f" or KL(topics) > {s.kl_threshold:g}" if s.kl_threshold else "")
        + (f" or MMD² > {s.mmd_threshold:g}" if s.mmd_threshold else "")
        + f"; an event after {s.consecutive} drifted windows in a row, then {s.cooldown_windows}"
        f" windows of cooldown; knowledge gap when ≥ {s.gap_share:.0%} of questions score "
        f"< {s.gap_score:g}"
    )
    print(
        f"questions seen {status.questions_seen}, waiting for the next window {status.pending}, "
        f"streak {status.streak}, cooldown until window {status.cooldown_until}, events "
        f"{status.events}, dead letters {status.dead_letters}"
    )
    for gap in status.gaps:
        state = f"closed {_when(gap.closed_ms)}" if gap.closed_ms else "open"
        print(
            f"knowledge gap {gap.idempotency_key}: {state}, {gap.covered_share:.0%} of its "
            f"{len(gap.questions)} questions now find a passage"
        )
    if status.windows:
        print(
            f"\n{'window':>6}  {'last question (UTC)':19}  {'mmd2':>8}  {'p':>6}  {'KL top':>6}  "
            f"{'KL term':>7}  {'poor':>5}  {'lowconf':>7}  drift"
        )
    for w in status.windows:
        mark = f"DRIFT {','.join(w.triggered_by)}" if w.drift else "-"
        print(
            f"{w.index:>6}  {_when(w.end_ms):19}  {w.mmd2:8.5f}  {w.p_value:6.3f}  "
            f"{w.kl_topics:6.3f}  {w.kl_terms:7.3f}  {w.poorly_retrieved_share:5.2f}  "
            f"{w.low_confidence_share:7.2f}  {mark}"
        )
    return 0


def event_json(event: events_pb2.DriftEvent) -> dict[str, Any]:
    kind = event.WhichOneof("kind")
    inner = getattr(event, kind)
    return {
        "kind": "RetrainRequested" if kind == "retrain_requested" else "KnowledgeGap",
        "idempotency_key": inner.idempotency_key,
        "event_id": inner.header.event_id,
        "produced_at_ms": inner.header.produced_at_ms,
        "reference_id": inner.reference_id,
        "reason": inner.reason,
        "windows": [w.index for w in inner.windows],
        "poorly_retrieved_share": round(inner.poorly_retrieved_share, 4),
        "example_questions": list(inner.example_questions),
        "from_ms": inner.from_ms,
        "to_ms": inner.to_ms,
    }


def cmd_events(args: argparse.Namespace, settings: CommonSettings) -> int:
    try:
        reply = _monitor(settings).ListEvents(
            monitor_pb2.ListEventsRequest(limit=args.limit), timeout=args.timeout
        )
    except grpc.RpcError as exc:
        return rpc_failed("drift events", exc)
    for event in reply.events:
        e = event_json(event)
        if args.json:
            print(json.dumps(e))
            continue
        print(f"{_when(e['produced_at_ms'])}  {e['kind']}  {e['idempotency_key']}")
        print(f"  {e['reason']}")
        for q in e["example_questions"][:3]:
            print(f"  - {q}")
    if not reply.events and not args.json:
        print("no drift events")
    return 0


def parse_ms(value: str) -> int:
    """Milliseconds since epoch, or an ISO date/time (UTC unless it says otherwise)."""
    if value.isdigit():
        return int(value)
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def cmd_reference(args: argparse.Namespace, settings: CommonSettings) -> int:
    request = monitor_pb2.SetReferenceRequest(
        description=args.description or "", restart_windows=args.restart_windows
    )
    try:
        if args.file:
            from services.monitor.replay import read_texts

            request.texts.texts.extend(read_texts(Path(args.file)))
        elif args.recent:
            request.recent = args.recent
        elif args.adapter:
            request.adapter = args.adapter
        elif args.since:
            request.time_range.from_ms = parse_ms(args.since)
            request.time_range.to_ms = parse_ms(args.until) if args.until else 0
        else:
            print("drift reference: give --file, --recent, --adapter or --since", file=sys.stderr)
            return 2
    except (OSError, ValueError) as exc:
        print(f"drift reference: {exc}", file=sys.stderr)
        return 2
    try:
        info = _monitor(settings).SetReference(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        return rpc_failed("drift reference", exc)
    out = json_format.MessageToDict(info, preserving_proto_field_name=True)
    print(json.dumps(out) if args.json else f"reference {info.id}: {info.size} questions")
    return 0


def cmd_report(args: argparse.Namespace, settings: CommonSettings) -> int:
    from services.monitor.report import plot

    stub = _monitor(settings)
    try:
        status = stub.GetDriftStatus(
            monitor_pb2.GetDriftStatusRequest(windows=args.windows), timeout=args.timeout
        )
        events = stub.ListEvents(monitor_pb2.ListEventsRequest(limit=1000), timeout=args.timeout)
    except grpc.RpcError as exc:
        return rpc_failed("drift report", exc)
    try:
        plot(
            list(status.windows),
            list(events.events),
            status.settings,
            Path(args.out),
            title=f"knowstream drift, reference {status.reference.id or '-'}",
        )
    except ValueError as exc:
        print(f"drift report: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(status.windows)} windows, {len(events.events)} events)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("drift", help="drift detection")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("replay", help="replay the detector over a JSONL stream, offline")
    a.add_argument("--reference", required=True, help='JSONL of {"text": ...}')
    a.add_argument("--stream", required=True, help='JSONL of {"text": ...}')
    a.add_argument("--window", type=int, default=0, help="window size (default: setting)")
    a.add_argument("--step", type=int, default=0, help="default: a full window")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_replay)
    a = acts.add_parser("status", help="the reference, the policy state and the latest windows")
    a.add_argument("--windows", type=int, default=20)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_status)
    a = acts.add_parser("events", help="RetrainRequested / KnowledgeGap decisions, newest first")
    a.add_argument("--limit", type=int, default=20)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_events)
    a = acts.add_parser("reference", help="set the reference the windows are compared with")
    source = a.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help='JSONL of {"text": ...} (embedded by the embed service)')
    source.add_argument("--recent", type=int, help="the last N questions the monitor saw")
    source.add_argument("--adapter", help="training questions of an adapter (or live)")
    source.add_argument("--since", help="questions seen since (ms since epoch or ISO time)")
    a.add_argument("--until", help="with --since: up to (default now)")
    a.add_argument("--description", default="")
    a.add_argument(
        "--restart-windows",
        action="store_true",
        help="start windows afresh with the next question (clears the streak and the cooldown)",
    )
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_reference)
    a = acts.add_parser("report", help="plot the statistics over time (PNG)")
    a.add_argument("--out", required=True, help="PNG file to write")
    a.add_argument("--windows", type=int, default=200)
    a.set_defaults(func=cmd_report)
