"""`knowstream status`: the stack's components, then what the index, the drift monitor and the
trainer report, each part left out when its service does not answer."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from knowstream.monitor.v1 import monitor_pb2
from knowstream.retrieve.v1 import retrieve_pb2
from knowstream.trainer.v1 import trainer_pb2
from services.cli import stubs
from services.common.settings import CommonSettings

Summary = dict[str, Any]
T = TypeVar("T")


def _answered(call: Callable[[], T]) -> T | None:
    try:
        return call()
    except grpc.RpcError:
        return None


def index_summary(stats: retrieve_pb2.IndexStats) -> Summary:
    return {
        "chunks": stats.chunks,
        "documents": stats.documents,
        "pending_chunks": stats.pending_chunks,
        "bm25_lag_chunks": stats.bm25_lag_chunks,
        "dense_backend": stats.dense_backend,
    }


def drift_summary(drift: monitor_pb2.DriftStatus) -> Summary:
    last = drift.windows[-1] if drift.windows else None
    return {
        "reference": drift.reference.id or None,
        "questions_seen": drift.questions_seen,
        "last_window": last.index if last else None,
        "last_p_value": round(last.p_value, 4) if last else None,
        "last_drift": last.drift if last else None,
        "streak": drift.streak,
        "events": drift.events,
        "open_gaps": sum(1 for g in drift.gaps if not g.closed_ms),
    }


def training_summary(jobs: list[trainer_pb2.Job], policy: trainer_pb2.Policy) -> Summary:
    last = jobs[0] if jobs else None
    return {
        "policy": policy.mode,
        "watching": policy.watching or None,
        "shadow_pairs": policy.pairs,
        "last_job": last.id if last else None,
        "last_job_state": last.state if last else None,
        "last_job_step": f"{last.step}/{last.steps}" if last else None,
        "last_adapter": (last.adapter_id or None) if last else None,
        "last_rollout": (last.rollout or None) if last else None,
    }


def summaries(settings: CommonSettings) -> dict[str, Summary]:
    """What each service answers within 3 s: "index", "drift", "training" (absent if not)."""
    out: dict[str, Summary] = {}
    stats = _answered(
        lambda: stubs.retrieve(settings).GetIndexStats(
            retrieve_pb2.GetIndexStatsRequest(), timeout=3
        )
    )
    if stats is not None:
        out["index"] = index_summary(stats)
    drift = _answered(
        lambda: stubs.monitor(settings).GetDriftStatus(
            monitor_pb2.GetDriftStatusRequest(windows=1), timeout=3
        )
    )
    if drift is not None:
        out["drift"] = drift_summary(drift)
    trainer = stubs.trainer(settings)
    jobs = _answered(
        lambda: list(trainer.ListJobs(trainer_pb2.ListJobsRequest(limit=1), timeout=3).jobs)
    )
    policy = _answered(lambda: trainer.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=3))
    if jobs is not None and policy is not None:
        out["training"] = training_summary(jobs, policy)
    return out


def describe(parts: dict[str, Summary]) -> list[str]:
    """The human lines under the component table."""
    lines = []
    if (i := parts.get("index")) is not None:
        lines.append(
            f"\nindex: {i['documents']} documents, {i['chunks']} chunks "
            f"({i['pending_chunks']} pending, {i['bm25_lag_chunks']} awaiting BM25), "
            f"dense backend {i['dense_backend']}"
        )
    if (d := parts.get("drift")) is not None:
        window = (
            f"last window {d['last_window']} p={d['last_p_value']}"
            + (" DRIFT" if d["last_drift"] else "")
            if d["last_window"] is not None
            else "no window yet"
        )
        lines.append(
            f"drift: reference {d['reference'] or 'none yet'}, {d['questions_seen']} "
            f"questions, {window}, {d['events']} events, {d['open_gaps']} open knowledge gaps"
        )
    if (t := parts.get("training")) is not None:
        job = (
            f"last job {t['last_job']} {t['last_job_state']} (step {t['last_job_step']})"
            + (f", adapter {t['last_adapter']}" if t["last_adapter"] else "")
            + (f", rollout {t['last_rollout']}" if t["last_rollout"] else "")
            if t["last_job"]
            else "no job yet"
        )
        watching = (
            f", watching {t['watching']} ({t['shadow_pairs']} shadow pairs)"
            if t["watching"]
            else ""
        )
        lines.append(f"training: policy {t['policy']}{watching}; {job}")
    return lines


def cmd_status(args: argparse.Namespace, settings: CommonSettings) -> int:
    from deploy.stack import Stack, print_status

    rows = Stack().status()
    parts = summaries(settings)
    if args.json:
        # Key order kept from before: components, training, drift, index.
        out: dict[str, object] = {"components": rows}
        out |= {k: parts[k] for k in ("training", "drift", "index") if k in parts}
        print(json.dumps(out))
    else:
        print_status(rows)
        for line in describe(parts):
            print(line)
    return 0 if all(r["state"] in ("UP", "SERVING") for r in rows) else 3


def add_commands(sub: Any) -> None:
    p = sub.add_parser("status", help="components, health and index size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
