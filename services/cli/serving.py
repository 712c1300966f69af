"""``knowstream ask``, ``feedback`` and ``adapters ...``: the serving side of the CLI."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2
from services.cli import stubs
from services.cli.rpc import rpc_failed
from services.cli.train import add_policy_command
from services.common.adapter_upload import upload_adapter
from services.common.settings import CommonSettings

_infer = stubs.infer
_admin = stubs.admin


def ask_request(args: argparse.Namespace) -> infer_pb2.AskRequest:
    return infer_pb2.AskRequest(
        question=args.question,
        k=args.k,
        adapter=args.adapter or "",
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        template=args.template or "",
        candidates=args.candidates or [],
        no_retrieval=args.no_retrieval,
        caller=args.caller or "",
        filters=retrieve_pb2.SearchFilters(domains=args.domain or []),
    )


def answer_json(reply: infer_pb2.AskResponse) -> dict[str, Any]:
    latency = reply.latency
    return {
        "answer": reply.answer,
        "citations": [{"doc_id": c.doc_id, "chunk_id": c.chunk_id} for c in reply.citations],
        "adapter": reply.adapter,
        "confidence": round(reply.confidence, 4),
        "latency_ms": {
            "retrieve": round(latency.retrieve_ms, 1),
            "prompt": round(latency.prompt_ms, 1),
            "generate": round(latency.generate_ms, 1),
            "total": round(latency.total_ms, 1),
        },
        "request_id": reply.request_id,
        "route": reply.route,
        "finish_reason": reply.finish_reason,
        "tokens": {"prompt": reply.prompt_tokens, "completion": reply.completion_tokens},
    }


def cmd_ask(args: argparse.Namespace, settings: CommonSettings) -> int:
    request = ask_request(args)
    try:
        if args.stream and not args.json:
            final = None
            for chunk in _infer(settings).AskStream(request, timeout=args.timeout):
                if chunk.HasField("final"):
                    final = chunk.final
                else:
                    print(chunk.text, end="", flush=True)
            print()
            if final is None:
                print("stream ended without a final answer", file=sys.stderr)
                return 1
            reply = final
        else:
            reply = _infer(settings).Ask(request, timeout=args.timeout)
            if not args.json:
                print(reply.answer)
    except grpc.RpcError as exc:
        return rpc_failed("ask", exc)
    if args.json:
        print(json.dumps(answer_json(reply)))
        return 0
    print()
    for c in reply.citations:
        mark = "*" if c.referenced else " "
        print(f"{mark}[{c.number}] {c.doc_id}  {c.chunk_id}")
    lat = reply.latency
    print(
        f"(adapter {reply.adapter} via {reply.route}, confidence {reply.confidence:.2f}; "
        f"retrieve {lat.retrieve_ms:.0f} ms, generate {lat.generate_ms:.0f} ms, "
        f"total {lat.total_ms:.0f} ms; request {reply.request_id})"
    )
    return 0


def cmd_feedback(args: argparse.Namespace, settings: CommonSettings) -> int:
    try:
        reply = _infer(settings).SubmitFeedback(
            infer_pb2.FeedbackRequest(
                request_id=args.request_id,
                rating=args.rating,
                correction=args.correction or "",
                comment=args.comment or "",
            ),
            timeout=args.timeout,
        )
    except grpc.RpcError as exc:
        return rpc_failed("feedback", exc)
    print(reply.event_id)
    return 0


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _rollout_dict(r: infer_pb2.RolloutState) -> dict[str, Any]:
    return {
        "live": r.live,
        "candidate": r.candidate,
        "mode": r.mode,
        "shadow_share": round(r.shadow_share, 4),
        "canary_share": round(r.canary_share, 4),
        "version": r.version,
        "history": list(r.history),
    }


def _adapter_dict(a: infer_pb2.AdapterStatus) -> dict[str, Any]:
    return {
        "id": a.id,
        "aliases": list(a.aliases),
        "loaded": a.loaded,
        "base_model": a.base_model,
        "rank": a.rank,
        "alpha": a.alpha,
        "target_modules": list(a.target_modules),
        "size_bytes": a.size_bytes,
        "created": _when(a.created_at_ms),
        "source": a.source,
        "parent": a.parent,
        "description": a.description,
        "lineage": json.loads(a.lineage_json or "{}"),
    }


def _print_rollout(r: infer_pb2.RolloutState, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_rollout_dict(r)))
        return
    candidate = f"{r.candidate} ({r.mode})" if r.candidate else "none"
    share = r.shadow_share if r.mode == "shadow" else r.canary_share
    print(
        f"live: {r.live}   candidate: {candidate}" + (f" share {share:.2f}" if r.candidate else "")
    )
    print(f"rollout version {r.version}; rollback history: {', '.join(r.history) or 'empty'}")


def print_lineage(
    admin: infer_pb2_grpc.AdapterAdminServiceStub, status: infer_pb2.AdapterStatus, t: float
) -> None:
    """The chain of parents down to the base model, one line each: how it was made."""
    print("\nlineage (newest first):")
    seen: set[str] = set()
    current: infer_pb2.AdapterStatus | None = status
    while current is not None and current.id not in seen:
        seen.add(current.id)
        lineage = json.loads(current.lineage_json or "{}")
        gate = lineage.get("gate", {})
        facts = [current.source or "-", _when(current.created_at_ms)]
        if lineage.get("trigger"):
            facts.append(f"trigger {lineage['trigger']}")
        if lineage.get("dataset_hash"):
            facts.append(f"dataset {lineage['dataset_hash']}")
        if gate:
            facts.append(
                f"gate accuracy {gate.get('accuracy', 0):.3f} vs live "
                f"{gate.get('live_accuracy', 0):.3f}, forgetting "
                f"{gate.get('forgetting_pct', 0):+.2f}%"
            )
        print(f"  {current.id}  " + "; ".join(facts))
        parent = current.parent
        if not parent or parent == "base":
            print("  base")
            return
        try:
            current = admin.GetAdapter(infer_pb2.GetAdapterRequest(adapter=parent), timeout=t)
        except grpc.RpcError:
            print(f"  {parent}  (no longer registered)")
            return


def _adapters_list(admin: Any, args: argparse.Namespace) -> None:
    reply = admin.ListAdapters(infer_pb2.ListAdaptersRequest(), timeout=args.timeout)
    if args.json:
        adapters = [_adapter_dict(a) for a in reply.adapters]
        print(json.dumps({"adapters": adapters, "rollout": _rollout_dict(reply.rollout)}))
        return
    print(f"{'ID':<18} {'ALIASES':<16} {'LOADED':<7} {'RANK':<5} {'SOURCE':<10} CREATED")
    for a in reply.adapters:
        print(
            f"{a.id:<18} {','.join(a.aliases) or '-':<16} {'yes' if a.loaded else 'no':<7} "
            f"{a.rank:<5} {a.source or '-':<10} {_when(a.created_at_ms)}"
        )
    print()
    _print_rollout(reply.rollout, False)


def _adapters_show(admin: Any, args: argparse.Namespace) -> None:
    request = infer_pb2.GetAdapterRequest(adapter=args.adapter)
    status = admin.GetAdapter(request, timeout=args.timeout)
    if args.json:
        print(json.dumps(_adapter_dict(status)))
        return
    print(json.dumps(_adapter_dict(status), indent=2))
    print_lineage(admin, status, args.timeout)


def _adapters_register(admin: Any, args: argparse.Namespace) -> None:
    description = args.description or ""
    if args.server_path:  # a directory inside the service's import directory
        request = infer_pb2.RegisterAdapterRequest(
            path=args.path, description=description, load=args.load
        )
        status = admin.RegisterAdapter(request, timeout=args.timeout)
    else:
        status = upload_adapter(
            admin, Path(args.path), timeout=args.timeout, description=description, load=args.load
        )
    print(json.dumps(_adapter_dict(status)) if args.json else status.id)


def _print_loaded(reply: Any, args: argparse.Namespace, done: str) -> None:
    if args.json:
        loaded = {"adapter_id": reply.adapter_id, "loaded": list(reply.loaded)}
        print(json.dumps(loaded | ({"load_s": reply.load_s} if done == "loaded" else {})))
    elif done == "loaded":
        holds = ", ".join(reply.loaded)
        print(f"{reply.adapter_id} loaded in {reply.load_s:.3f}s; Triton holds: {holds}")
    else:
        print(f"{reply.adapter_id} unloaded; Triton holds: {', '.join(reply.loaded) or 'none'}")


def _adapters_load(admin: Any, args: argparse.Namespace) -> None:
    adapter = args.adapter
    if Path(adapter).is_dir():  # a local directory: uploaded first
        adapter = upload_adapter(admin, Path(adapter), timeout=args.timeout).id
    request = infer_pb2.LoadAdapterRequest(adapter=adapter)
    _print_loaded(admin.LoadAdapter(request, timeout=args.timeout), args, "loaded")


def _adapters_unload(admin: Any, args: argparse.Namespace) -> None:
    request = infer_pb2.LoadAdapterRequest(adapter=args.adapter)
    _print_loaded(admin.UnloadAdapter(request, timeout=args.timeout), args, "unloaded")


def _adapters_rollout(admin: Any, args: argparse.Namespace) -> None:
    """shadow / canary / off."""
    request = infer_pb2.SetRolloutRequest(adapter=getattr(args, "adapter", ""), mode=args.action)
    if getattr(args, "share", None) is not None:
        request.share = args.share
    _print_rollout(admin.SetRollout(request, timeout=args.timeout), args.json)


def _adapters_promote(admin: Any, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    request = infer_pb2.PromoteRequest(adapter=args.adapter or "", reason=args.reason or "")
    _print_rollout(admin.Promote(request, timeout=args.timeout), args.json)
    if not args.json:
        print(f"promoted in {time.perf_counter() - start:.3f}s")


def _adapters_rollback(admin: Any, args: argparse.Namespace) -> None:
    request = infer_pb2.RollbackRequest(reason=args.reason or "")
    _print_rollout(admin.Rollback(request, timeout=args.timeout), args.json)


ADAPTER_ACTIONS: dict[str, Callable[[Any, argparse.Namespace], None]] = {
    "list": _adapters_list,
    "show": _adapters_show,
    "register": _adapters_register,
    "load": _adapters_load,
    "unload": _adapters_unload,
    "shadow": _adapters_rollout,
    "canary": _adapters_rollout,
    "off": _adapters_rollout,
    "promote": _adapters_promote,
    "rollback": _adapters_rollback,
}


def cmd_adapters(args: argparse.Namespace, settings: CommonSettings) -> int:
    try:
        ADAPTER_ACTIONS[args.action](_admin(settings), args)
    except grpc.RpcError as exc:
        return rpc_failed(f"adapters {args.action}", exc)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ask", help="ask a question; the answer cites retrieved passages")
    p.add_argument("question")
    p.add_argument("-k", type=int, default=0, help="passages to retrieve (0 = service default)")
    p.add_argument("--adapter", help="adapter id or alias (live, canary, shadow, base)")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--template", choices=["cited", "step_by_step"])
    p.add_argument("--candidates", nargs="+", help="score mode: pick one of these answers")
    p.add_argument("--no-retrieval", action="store_true")
    p.add_argument("--domain", action="append")
    p.add_argument("--caller", help="caller id (canary routing is sticky per caller)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--json", action="store_true", help="last line: the answer as JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("feedback", help="rate or correct an answer")
    p.add_argument("request_id")
    p.add_argument("--rating", type=int, choices=[-1, 0, 1], default=0)
    p.add_argument("--correction")
    p.add_argument("--comment")
    p.set_defaults(func=cmd_feedback)

    add_adapter_commands(sub)


def add_adapter_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("adapters", help="LoRA adapters: registry, loading and rollout")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("list")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("show", help="metadata and lineage of an adapter (id or alias)")
    a.add_argument("adapter")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser(
        "register", help="upload and register a peft adapter directory (or a tar of one)"
    )
    a.add_argument("path")
    a.add_argument(
        "--server-path",
        action="store_true",
        help="PATH is a directory inside the service's import directory (KS_IMPORT_DIR): the "
        "service reads it there instead of receiving the files",
    )
    a.add_argument("--description")
    a.add_argument("--load", action="store_true")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("load", help="load an adapter (id, alias or directory) into Triton")
    a.add_argument("adapter")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("unload", help="unload an adapter from Triton (it stays registered)")
    a.add_argument("adapter")
    a.add_argument("--json", action="store_true")
    for mode, default_help in (("shadow", "mirrored share"), ("canary", "served share")):
        a = acts.add_parser(mode, help=f"make an adapter the candidate in {mode} mode")
        a.add_argument("adapter")
        a.add_argument("--share", type=float, help=f"{default_help} in [0, 1]")
        a.add_argument("--json", action="store_true")
    a = acts.add_parser("off", help="stop shadow/canary traffic to the candidate")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("promote", help="make the candidate (or ADAPTER) live")
    a.add_argument("adapter", nargs="?")
    a.add_argument("--reason")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("rollback", help="make the previous live adapter live again")
    a.add_argument("--reason")
    a.add_argument("--json", action="store_true")
    for action_parser in acts.choices.values():
        action_parser.set_defaults(func=cmd_adapters)
    add_policy_command(acts)
