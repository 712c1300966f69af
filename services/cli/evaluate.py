"""``knowstream eval pubmedqa``: accuracy of an adapter on PubMedQA-format questions, through the
infer service in score mode."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc

from knowstream.infer.v1 import infer_pb2
from knowstream.retrieve.v1 import retrieve_pb2
from services.cli import stubs
from services.cli.documents import ensure_ingested
from services.cli.knowledge import add_knowledge_command
from services.cli.rpc import rpc_failed
from services.common.clients import patiently
from services.common.keys import EVAL_CALLER
from services.common.settings import CommonSettings
from services.trainer.evaluation import LABELS, Answer, Item, evaluate, load_items


def cmd_eval_pubmedqa(args: argparse.Namespace, settings: CommonSettings) -> int:
    try:
        data = json.loads(Path(args.data).read_text(encoding="utf-8"))
        items = load_items(data)
    except (OSError, ValueError) as exc:
        print(f"eval: {args.data}: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        items = items[: args.limit]
    infer = stubs.infer(settings)
    retrieve = stubs.retrieve(settings)
    retrieval = not args.no_retrieval
    try:
        if retrieval:
            new = ensure_ingested(data, stubs.ingest(settings), retrieve, args.ingest_timeout)
            print(f"ingested {new} new abstracts", file=sys.stderr)

        def ask(item: Item) -> Answer:
            request = infer_pb2.AskRequest(
                question=item.question,
                candidates=list(LABELS),
                adapter=args.adapter,
                no_retrieval=not retrieval,
                k=args.k,
                caller=EVAL_CALLER,
            )
            # A batch client: shed beside live traffic (or a training job's scoring), it waits.
            reply = patiently(lambda left: infer.Ask(request, timeout=left), args.timeout)
            return Answer(reply.answer, reply.confidence, [c.doc_id for c in reply.citations])

        def search(item: Item) -> list[str]:
            reply = retrieve.Search(
                retrieve_pb2.SearchRequest(query=item.question, k=5), timeout=10
            )
            return [h.doc_id for h in reply.hits]

        def progress(done: int) -> None:
            if not args.json and (done % 25 == 0 or done == len(items)):
                print(f"\r{done}/{len(items)} answered", end="", file=sys.stderr, flush=True)

        started = time.monotonic()
        result = evaluate(
            items,
            ask,
            search if retrieval else None,
            concurrency=args.concurrency,
            progress=progress,
        )
    except grpc.RpcError as exc:
        return rpc_failed("eval", exc)
    except (ValueError, TimeoutError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        print(file=sys.stderr)
    result["adapter"] = args.adapter
    result["retrieval"] = retrieval
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("eval", help="evaluate an adapter")
    kinds = p.add_subparsers(dest="kind", required=True)
    a = kinds.add_parser(
        "pubmedqa", help="yes/no/maybe accuracy on a PubMedQA-format file (score mode)"
    )
    a.add_argument("--data", required=True, help="PubMedQA JSON ({pmid: {QUESTION, ...}})")
    a.add_argument("--adapter", default="live", help="adapter id or alias (default: live)")
    a.add_argument("--no-retrieval", action="store_true", help="answer without evidence")
    a.add_argument("-k", type=int, default=0, help="passages per question (0: service default)")
    a.add_argument("--concurrency", type=int, default=8, help="questions in flight")
    a.add_argument("--limit", type=int, default=0, help="only the first N items")
    a.add_argument("--ingest-timeout", type=float, default=600)
    a.add_argument("--json", action="store_true", help="no progress; the last line is JSON")
    a.set_defaults(func=cmd_eval_pubmedqa)
    add_knowledge_command(kinds)
