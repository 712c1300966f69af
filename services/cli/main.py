"""The knowstream command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2
from services.cli import stubs
from services.cli.audit import add_commands as add_audit_commands
from services.cli.documents import pubmedqa_document
from services.cli.drift import add_commands as add_drift_commands
from services.cli.evaluate import add_commands as add_eval_commands
from services.cli.indexing import grpc_lookup, to_wait_for, wait_searchable
from services.cli.serving import add_commands as add_serving_commands
from services.cli.status import add_commands as add_status_commands
from services.cli.trace import add_commands as add_trace_commands
from services.cli.train import add_commands as add_train_commands
from services.common import tracing
from services.common.clients import use_token
from services.common.settings import CommonSettings

DESCRIPTION = (
    "knowstream: ingest documents, search them, ask the served model, and run its adapters, "
    "drift monitor and trainer. Each command has its own --help."
)


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


def _document(obj: dict, where: str) -> ingest_pb2.Document:  # type: ignore[type-arg]
    if not isinstance(obj, dict):
        raise SystemExit(f"{where}: expected a JSON object")
    meta = obj.get("metadata") or {}
    groups = meta.get("access_groups", obj.get("access_groups", []))
    return ingest_pb2.Document(
        id=str(obj.get("id", "")),
        title=str(obj.get("title", "")),
        text=str(obj.get("text", "")),
        metadata=events_pb2.DocumentMetadata(
            source=str(meta.get("source", obj.get("source", where.split(":")[0]))),
            domain=str(meta.get("domain", obj.get("domain", ""))),
            tags=[str(t) for t in meta.get("tags", obj.get("tags", []))],
            attributes={str(k): str(v) for k, v in meta.get("attributes", {}).items()},
            access_groups=groups.split(",") if isinstance(groups, str) else map(str, groups),
        ),
    )


def cmd_ingest(args: argparse.Namespace, settings: CommonSettings) -> int:
    from tqdm import tqdm

    docs = [d for p in args.paths for d in load_documents(Path(p))]
    stub = stubs.ingest(settings)
    totals = {"accepted": 0, "unchanged": 0, "rejected": 0}
    errors = []
    results: list[ingest_pb2.DocumentResult] = []
    quiet = args.json or not sys.stderr.isatty()
    with tqdm(total=len(docs), unit="doc", desc="sending", disable=quiet) as bar:
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
            results.extend(reply.results)
            bar.update(len(batch))
    for e in errors[:20]:
        print(f"rejected: {e}", file=sys.stderr)
    left = {} if args.no_wait else _wait_indexed(stub, results, args, quiet)
    if args.json:
        waited = {} if args.no_wait else {"not_searchable": sorted(left)}
        print(json.dumps({**totals, "documents": len(docs), **waited}))
    else:
        print(
            f"{len(docs)} documents: {totals['accepted']} accepted, {totals['unchanged']} "
            f"unchanged, {totals['rejected']} rejected"
            + ("" if args.no_wait else f"; {len(left)} not searchable yet" if left else "")
        )
    if left:
        return 3
    return 0 if not totals["rejected"] else 2


def _wait_indexed(
    stub: ingest_pb2_grpc.IngestServiceStub,
    results: list[ingest_pb2.DocumentResult],
    args: argparse.Namespace,
    quiet: bool,
) -> dict[str, str]:
    """Waits, with a progress bar over the indexing, until the accepted versions are
    searchable; returns those that are not when --wait-timeout has passed."""
    from tqdm import tqdm

    pending = to_wait_for(results)
    with tqdm(total=len(pending), unit="doc", desc="indexing", disable=quiet) as bar:
        left = wait_searchable(pending, grpc_lookup(stub, args.timeout), bar.update, args.wait)
    if left:
        print(
            f"{len(left)} accepted documents not searchable after {args.wait:g}s "
            f"(e.g. {next(iter(left))}); see `knowstream status`",
            file=sys.stderr,
        )
    return left


MODE_NAMES = {
    "hybrid": retrieve_pb2.SEARCH_MODE_HYBRID,
    "dense": retrieve_pb2.SEARCH_MODE_DENSE,
    "bm25": retrieve_pb2.SEARCH_MODE_BM25,
}


def cmd_search(args: argparse.Namespace, settings: CommonSettings) -> int:
    stub = stubs.retrieve(settings)
    request = retrieve_pb2.SearchRequest(
        query=args.query,
        k=args.k,
        mode=MODE_NAMES[args.mode],
        filters=retrieve_pb2.SearchFilters(domains=args.domain or [], sources=args.source or []),
    )
    if args.group is not None:  # narrows what the token may read to these groups
        request.filters.access.SetInParent()
        request.filters.access.groups.extend(g for gs in args.group for g in gs.split(",") if g)
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


def add_knowledge_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ingest", help="ingest JSONL, PubMedQA JSON or text files")
    p.add_argument("paths", nargs="+")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--no-wait", action="store_true", help="return at ingest's ack, before indexing")
    p.add_argument(
        "--wait",
        type=float,
        default=600,
        metavar="SECONDS",
        help="how long to wait for the accepted documents to become searchable (exit 3 after)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("search", help="hybrid search")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--domain", action="append")
    p.add_argument("--source", action="append")
    p.add_argument(
        "--group",
        action="append",
        help="search only public documents and these access groups (within the token's own)",
    )
    p.add_argument("--mode", choices=list(MODE_NAMES), default="hybrid")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="knowstream", description=DESCRIPTION)
    parser.add_argument("--timeout", type=float, default=60, help="per-call deadline, seconds")
    parser.add_argument(
        "--token",
        help="bearer token to present (default KS_TOKEN, else the admin token of "
        "<run dir>/tokens.json, which make up writes)",
    )
    parser.add_argument(
        "--traceparent",
        help="W3C traceparent the command's calls carry (default: a new trace per command; "
        "ingest and ask print its id for `knowstream trace`)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_knowledge_commands(sub)
    add_serving_commands(sub)
    add_drift_commands(sub)
    add_eval_commands(sub)
    add_train_commands(sub)
    add_audit_commands(sub)
    add_trace_commands(sub)
    add_status_commands(sub)
    args = parser.parse_args(argv)
    trace = tracing.parse_traceparent(args.traceparent) if args.traceparent else tracing.new_trace()
    if trace is None:
        parser.error(f"--traceparent {args.traceparent!r} is not a W3C traceparent")
    use_token(args.token)
    token = tracing.use(trace)
    try:
        code = int(args.func(args, CommonSettings()))
        if args.command in ("ingest", "ask"):
            print(f"trace {trace.trace_id}", file=sys.stderr)
        return code
    finally:
        # Tests call main() in process: the next call starts from the defaults.
        use_token(None)
        tracing.restore(token)


if __name__ == "__main__":
    sys.exit(main())
