"""The ``knowstream`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.drift import add_commands as add_drift_commands
from services.cli.evaluate import add_commands as add_eval_commands
from services.cli.serving import add_commands as add_serving_commands
from services.cli.train import add_commands as add_train_commands
from services.common.clients import sync_channel
from services.common.settings import CommonSettings


def load_documents(path: Path) -> Iterator[ingest_pb2.Document]:
    """JSONL of documents, PubMedQA's JSON (id -> item), or a plain text file (one document)."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield _document(json.loads(line), f"{path}:{n}")
        return
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and all(
            isinstance(v, dict) and "CONTEXTS" in v for v in data.values()
        ):
            for pmid, item in data.items():
                yield pubmedqa_document(pmid, item)
            return
        items = data if isinstance(data, list) else [data]
        for n, obj in enumerate(items):
            yield _document(obj, f"{path}[{n}]")
        return
    text = path.read_text(encoding="utf-8", errors="strict")
    yield ingest_pb2.Document(
        id=str(path),
        title=path.stem,
        text=text,
        metadata=events_pb2.DocumentMetadata(source=str(path)),
    )


def pubmedqa_document(pmid: str, item: dict) -> ingest_pb2.Document:  # type: ignore[type-arg]
    """A PubMedQA item as a document: its id is the PubMed id, its text the joined CONTEXTS.
    The question is not part of the document (it would leak the evaluation query)."""
    return ingest_pb2.Document(
        id=str(pmid),
        text="\n".join(item["CONTEXTS"]),
        metadata=events_pb2.DocumentMetadata(
            source="pubmedqa", domain="medicine", tags=item.get("MESHES", [])[:32]
        ),
    )


def _document(obj: dict, where: str) -> ingest_pb2.Document:  # type: ignore[type-arg]
    if not isinstance(obj, dict):
        raise SystemExit(f"{where}: expected a JSON object")
    meta = obj.get("metadata") or {}
    return ingest_pb2.Document(
        id=str(obj.get("id", "")),
        title=str(obj.get("title", "")),
        text=str(obj.get("text", "")),
        metadata=events_pb2.DocumentMetadata(
            source=str(meta.get("source", obj.get("source", where.split(":")[0]))),
            domain=str(meta.get("domain", obj.get("domain", ""))),
            tags=[str(t) for t in meta.get("tags", obj.get("tags", []))],
            attributes={str(k): str(v) for k, v in meta.get("attributes", {}).items()},
        ),
    )


def cmd_ingest(args: argparse.Namespace, settings: CommonSettings) -> int:
    from tqdm import tqdm

    docs = [d for p in args.paths for d in load_documents(Path(p))]
    stub = ingest_pb2_grpc.IngestServiceStub(sync_channel(settings.address(settings.ingest_port)))
    totals = {"accepted": 0, "unchanged": 0, "rejected": 0}
    errors = []
    with tqdm(total=len(docs), unit="doc", disable=args.json or not sys.stderr.isatty()) as bar:
        for start in range(0, len(docs), args.batch):
            batch = docs[start : start + args.batch]
            try:
                reply = stub.IngestDocumentStream(iter(batch), timeout=args.timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    print(f"ingest failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
                totals["rejected"] += len(batch)
                errors.append(exc.details())
                bar.update(len(batch))
                continue
            for key in totals:
                totals[key] += getattr(reply, key)
            errors.extend(f"{r.id}: {r.error}" for r in reply.results if r.error)
            bar.update(len(batch))
    for e in errors[:20]:
        print(f"rejected: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps({**totals, "documents": len(docs)}))
    else:
        print(
            f"{len(docs)} documents: {totals['accepted']} accepted, {totals['unchanged']} "
            f"unchanged, {totals['rejected']} rejected"
        )
    return 0 if not totals["rejected"] else 2


MODE_NAMES = {
    "hybrid": retrieve_pb2.SEARCH_MODE_HYBRID,
    "dense": retrieve_pb2.SEARCH_MODE_DENSE,
    "bm25": retrieve_pb2.SEARCH_MODE_BM25,
}


def cmd_search(args: argparse.Namespace, settings: CommonSettings) -> int:
    stub = retrieve_pb2_grpc.RetrieveServiceStub(
        sync_channel(settings.address(settings.retrieve_port))
    )
    request = retrieve_pb2.SearchRequest(
        query=args.query,
        k=args.k,
        mode=MODE_NAMES[args.mode],
        filters=retrieve_pb2.SearchFilters(domains=args.domain or [], sources=args.source or []),
    )
    try:
        reply = stub.Search(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"search failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    hits = [
        {
            "doc_id": h.doc_id,
            "chunk_id": h.chunk_id,
            "score": round(h.score, 5),
            "dense_score": round(h.dense_score, 4),
            "bm25_score": round(h.bm25_score, 3),
            "domain": h.metadata.domain,
            "source": h.metadata.source,
            "title": h.title,
            "text": h.text,
        }
        for h in reply.hits
    ]
    if args.json:
        print(json.dumps({"hits": hits, "total_ms": round(reply.total_ms, 2)}))
        return 0
    for rank, h in enumerate(hits, start=1):
        snippet = " ".join(h["text"].split())[:160]
        print(
            f"{rank:>2}. {h['doc_id']}  [{h['chunk_id'].rsplit('#', 1)[-1]}]  "
            f"score={h['score']:.4f} dense={h['dense_score']:.3f} bm25={h['bm25_score']:.2f}"
        )
        print(f"    {snippet}")
    print(f"({len(hits)} hits in {reply.total_ms:.1f} ms)")
    return 0


def cmd_status(args: argparse.Namespace, settings: CommonSettings) -> int:
    from deploy.stack import Stack, print_status

    rows = Stack().status()
    stats = None
    try:
        stub = retrieve_pb2_grpc.RetrieveServiceStub(
            sync_channel(settings.address(settings.retrieve_port))
        )
        stats = stub.GetIndexStats(retrieve_pb2.GetIndexStatsRequest(), timeout=3)
    except grpc.RpcError:
        pass
    drift = None
    try:
        drift = monitor_pb2_grpc.MonitorServiceStub(
            sync_channel(settings.address(settings.monitor_port))
        ).GetDriftStatus(monitor_pb2.GetDriftStatusRequest(windows=1), timeout=3)
    except grpc.RpcError:
        pass
    drift_summary = None
    if drift is not None:
        last = drift.windows[-1] if drift.windows else None
        drift_summary = {
            "reference": drift.reference.id or None,
            "questions_seen": drift.questions_seen,
            "last_window": last.index if last else None,
            "last_p_value": round(last.p_value, 4) if last else None,
            "last_drift": last.drift if last else None,
            "streak": drift.streak,
            "events": drift.events,
            "open_gaps": sum(1 for g in drift.gaps if not g.closed_ms),
        }
    training = None
    try:
        trainer = trainer_pb2_grpc.TrainerServiceStub(
            sync_channel(settings.address(settings.trainer_port))
        )
        jobs = trainer.ListJobs(trainer_pb2.ListJobsRequest(limit=1), timeout=3).jobs
        policy = trainer.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=3)
        last_job = jobs[0] if jobs else None
        training = {
            "policy": policy.mode,
            "watching": policy.watching or None,
            "shadow_pairs": policy.pairs,
            "last_job": last_job.id if last_job else None,
            "last_job_state": last_job.state if last_job else None,
            "last_job_step": f"{last_job.step}/{last_job.steps}" if last_job else None,
            "last_adapter": (last_job.adapter_id or None) if last_job else None,
            "last_rollout": (last_job.rollout or None) if last_job else None,
        }
    except grpc.RpcError:
        pass
    if args.json:
        out: dict[str, object] = {"components": rows}
        if training is not None:
            out["training"] = training
        if drift_summary is not None:
            out["drift"] = drift_summary
        if stats is not None:
            out["index"] = {
                "chunks": stats.chunks,
                "documents": stats.documents,
                "pending_chunks": stats.pending_chunks,
                "bm25_lag_chunks": stats.bm25_lag_chunks,
                "dense_backend": stats.dense_backend,
            }
        print(json.dumps(out))
    else:
        print_status(rows)
        if stats is not None:
            print(
                f"\nindex: {stats.documents} documents, {stats.chunks} chunks "
                f"({stats.pending_chunks} pending, {stats.bm25_lag_chunks} awaiting BM25), "
                f"dense backend {stats.dense_backend}"
            )
        if drift_summary is not None:
            d = drift_summary
            window = (
                f"last window {d['last_window']} p={d['last_p_value']}"
                + (" DRIFT" if d["last_drift"] else "")
                if d["last_window"] is not None
                else "no window yet"
            )
            print(
                f"drift: reference {d['reference'] or 'none yet'}, {d['questions_seen']} "
                f"questions, {window}, {d['events']} events, {d['open_gaps']} open knowledge gaps"
            )
        if training is not None:
            t = training
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
            print(f"training: policy {t['policy']}{watching}; {job}")
    return 0 if all(r["state"] in ("UP", "SERVING") for r in rows) else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="knowstream", description=__doc__)
    parser.add_argument("--timeout", type=float, default=60, help="per-call deadline, seconds")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="ingest JSONL, PubMedQA JSON or text files")
    p.add_argument("paths", nargs="+")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("search", help="hybrid search")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--domain", action="append")
    p.add_argument("--source", action="append")
    p.add_argument("--mode", choices=list(MODE_NAMES), default="hybrid")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)
    add_serving_commands(sub)
    add_drift_commands(sub)
    add_eval_commands(sub)
    add_train_commands(sub)
    p = sub.add_parser("status", help="components, health and index size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return int(args.func(args, CommonSettings()))


if __name__ == "__main__":
    sys.exit(main())
