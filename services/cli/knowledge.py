"""``knowstream eval knowledge``: an adapter's knowledge probes on a file of documents, scored
through the infer service's Score RPC (Triton's score mode, as the trainer's gate scores them).

The tiers follow the adapter's lineage when it is a knowledge adapter (the documents it trained
on give M and P, its control documents C, the rest R with general text), else the trainer's
own split by id; to-learn probes are those the adapter's parent gets wrong. Closed-book by
default; ``--with-retrieval`` puts the best retrieved passage before each probe's sentence
(the retrieval upper bound).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.cli.rpc import rpc_failed
from services.common.clients import channel
from services.common.knowledge import Limits, ScoreFn, Split, evaluate_documents, split_control
from services.common.probes import Document, load_documents
from services.common.settings import CommonSettings

CONTROL_SHARE = 0.2  # the trainer's default (KS_TRAINER_CONTROL_SHARE)


def infer_score(infer: infer_pb2_grpc.InferServiceStub, timeout_s: float) -> ScoreFn:
    async def score(prompt: str, candidates: list[str], adapter: str) -> list[float]:
        reply = await infer.Score(
            infer_pb2.ScoreRequest(prompt=prompt, candidates=candidates, adapter=adapter),
            timeout=timeout_s,
        )
        return list(reply.logprobs)

    return score


def with_retrieval(
    score: ScoreFn, retrieve: retrieve_pb2_grpc.RetrieveServiceStub, k: int, timeout_s: float
) -> ScoreFn:
    """Scores with the ``k`` best passages for the probe's sentence start before it."""

    async def scored(prompt: str, candidates: list[str], adapter: str) -> list[float]:
        reply = await retrieve.Search(
            retrieve_pb2.SearchRequest(query=prompt, k=k), timeout=timeout_s
        )
        context = "\n\n".join(h.text for h in reply.hits)
        return await score(f"{context}\n\n{prompt}" if context else prompt, candidates, adapter)

    return scored


async def lineage_split(
    admin: infer_pb2_grpc.AdapterAdminServiceStub, adapter: str, docs: list[Document]
) -> tuple[str, Split]:
    """The adapter's id and its split: from its lineage when a knowledge job made it, else the
    trainer's split by id with the base model as the parent."""
    if adapter == "base":
        trained, control = split_control(docs, CONTROL_SHARE)
        return "base", Split({d.id for d in trained}, {d.id for d in control}, "base")
    status = await admin.GetAdapter(infer_pb2.GetAdapterRequest(adapter=adapter), timeout=10)
    lineage = json.loads(status.lineage_json or "{}")
    knowledge = (lineage.get("dataset") or {}).get("knowledge") or {}
    if knowledge:
        split = Split(
            set(knowledge.get("trained_documents", [])),
            set(knowledge.get("control_documents", [])),
            status.parent or "base",
        )
    else:
        trained, control = split_control(docs, CONTROL_SHARE)
        split = Split({d.id for d in trained}, {d.id for d in control}, status.parent or "base")
    return status.id, split


async def run(args: argparse.Namespace, settings: CommonSettings, docs: list[Document]) -> dict:  # type: ignore[type-arg]
    infer_channel = channel(settings.endpoint("infer"))
    retrieve_channel = channel(settings.endpoint("retrieve"))
    try:
        infer = infer_pb2_grpc.InferServiceStub(infer_channel)
        admin = infer_pb2_grpc.AdapterAdminServiceStub(infer_channel)
        adapter, split = await lineage_split(admin, args.adapter, docs)
        score = infer_score(infer, args.timeout)
        if args.with_retrieval:
            retrieve = retrieve_pb2_grpc.RetrieveServiceStub(retrieve_channel)
            score = with_retrieval(score, retrieve, args.k, args.timeout)
        to_learn = not args.all_probes and split.parent != adapter
        started = time.monotonic()
        probes, result = await evaluate_documents(
            docs,
            adapter,
            split,
            score,
            Limits(max_per_tier=args.max_probes, seed=args.seed),
            to_learn=to_learn,
            concurrency=args.concurrency,
        )
    finally:
        await infer_channel.close(None)
        await retrieve_channel.close(None)
    result.update(
        adapter=adapter,
        parent=split.parent,
        to_learn=to_learn,
        retrieval=bool(args.with_retrieval),
        probe_set=probes.digest,
        seconds=round(time.monotonic() - started, 1),
    )
    return result


def cmd_eval_knowledge(args: argparse.Namespace, settings: CommonSettings) -> int:
    try:
        docs = load_documents(args.docs, Path(args.docs).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(f"eval knowledge: {args.docs}: {exc}", file=sys.stderr)
        return 2
    try:
        result: dict[str, Any] = asyncio.run(run(args, settings, docs))
    except grpc.RpcError as exc:
        return rpc_failed("eval knowledge", exc)
    if not args.json:
        n = result["n"]
        for tier in ("M", "P", "C", "R"):
            low, high = result["ci95"][tier]
            print(
                f"tier {tier}: {result[tier]:.3f} (95% {low:.3f}-{high:.3f}, n={n[tier]})",
                file=sys.stderr,
            )
    print(json.dumps(result))
    return 0


def add_knowledge_command(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    k = kinds.add_parser(
        "knowledge",
        help="knowledge probes (tiers M/P/C/R) of a document file, closed-book by default",
    )
    k.add_argument(
        "--docs", required=True, help="PubMedQA JSON or JSONL documents ({id, text, metadata})"
    )
    k.add_argument("--adapter", default="live", help="adapter id or alias (default: live)")
    k.add_argument(
        "--with-retrieval", action="store_true", help="the best passages before each probe"
    )
    k.add_argument("-k", type=int, default=1, help="passages with --with-retrieval")
    k.add_argument(
        "--all-probes", action="store_true", help="every probe, not only the parent's to-learn"
    )
    k.add_argument("--max-probes", type=int, default=150, help="per tier")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--concurrency", type=int, default=8)
    k.add_argument("--timeout", type=float, default=120.0, help="per score call")
    k.add_argument("--json", action="store_true", help="the last line is JSON (always printed)")
    k.set_defaults(func=cmd_eval_knowledge)
