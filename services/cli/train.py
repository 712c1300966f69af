"""``knowstream train`` (queue a training job and follow it with a progress bar),
``knowstream jobs list|show|cancel`` and ``knowstream adapters policy``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli import stubs
from services.cli.documents import ensure_ingested
from services.cli.rpc import rpc_failed
from services.common.importdir import stage_for_import
from services.common.settings import CommonSettings

SUCCESS = ("registered",)


_trainer = stubs.trainer


def job_dict(job: trainer_pb2.Job) -> dict[str, Any]:
    out = json_format.MessageToDict(
        job, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for key in ("dataset_json", "config_json", "timings_json"):
        out[key.removesuffix("_json")] = json.loads(out.pop(key) or "{}")
    return out


def progress_line(job: trainer_pb2.Job, width: int = 30) -> str:
    if job.state != "training" or not job.steps:
        return f"job {job.id}: {job.state}"
    done = int(width * job.step / job.steps)
    bar = "#" * done + "-" * (width - done)
    return (
        f"job {job.id} [{bar}] step {job.step}/{job.steps} loss {job.loss:.4f} "
        f"{job.tokens_per_s:.0f} tok/s ETA {job.eta_s:.0f}s"
    )


def follow(stub: trainer_pb2_grpc.TrainerServiceStub, job_id: str, quiet: bool) -> trainer_pb2.Job:
    """Prints a progress line per change (one updating line on a terminal) until the job ends
    and the rollout policy has taken it."""
    tty = sys.stderr.isatty()
    job = trainer_pb2.Job(id=job_id)
    # The first message is the job as it is now; then one per change until it ends.
    for job in stub.WatchJob(trainer_pb2.GetJobRequest(id=job_id)):
        if not quiet:
            end = "" if tty and job.state == "training" else "\n"
            print(("\r" if tty else "") + progress_line(job), end=end, file=sys.stderr, flush=True)
    if not quiet and tty:
        print(file=sys.stderr)
    return job


def print_outcome(job: trainer_pb2.Job) -> None:
    g = job.gate
    print(f"job {job.id}: {job.state}" + (f" — adapter {job.adapter_id}" if job.adapter_id else ""))
    if job.error:
        print(f"  error: {job.error}")
    for reason in g.reasons:
        print(f"  gate: {reason}")
    if job.rollout:
        print(f"  rollout: {job.rollout}")
    if job.state == "rejected":
        print(f"  kept for inspection in {job.adapter_path}")


def ingest_labelled(path: Path, settings: CommonSettings, timeout_s: float) -> int:
    """Ingests a labelled file's abstracts and waits until they are searchable, so the trainer
    retrieves them as serving will."""
    return ensure_ingested(
        json.loads(path.read_text(encoding="utf-8")),
        stubs.ingest(settings),
        stubs.retrieve(settings),
        timeout_s,
    )


def cmd_train(args: argparse.Namespace, settings: CommonSettings) -> int:
    stub = _trainer(settings)
    request = trainer_pb2.TrainRequest(
        # The trainer reads only its import directory: a local file is copied there first.
        labelled_data=stage_for_import(Path(args.data), settings.import_root())
        if args.data
        else "",
        limit=args.limit,
        parent=args.parent or "",
        epochs=args.epochs,
        no_rollout=args.no_rollout,
        promote=args.promote,
        reason=args.reason or "manual",
        questions=args.question or [],
        max_tokens=args.max_tokens,
        mode={
            "knowledge": trainer_pb2.TRAIN_MODE_KNOWLEDGE,
            "labelled": trainer_pb2.TRAIN_MODE_LABELLED,
        }.get(args.mode or "", trainer_pb2.TRAIN_MODE_UNSPECIFIED),
        max_documents=args.max_documents,
    )
    if args.since:
        from services.cli.drift import parse_ms

        try:
            request.since_ms = parse_ms(args.since)
        except ValueError as exc:
            print(f"train: --since: {exc}", file=sys.stderr)
            return 2
    if args.min_gain is not None:
        request.gate.min_gain = args.min_gain
    if args.max_forgetting is not None:
        request.gate.max_forgetting_pct = args.max_forgetting
    if args.min_eval_items is not None:
        request.gate.min_eval_items = args.min_eval_items
    if args.force_reason:
        request.gate.force_reason = args.force_reason
    try:
        if args.ingest:
            if not args.data:
                print("train: --ingest needs --data", file=sys.stderr)
                return 2
            new = ingest_labelled(Path(args.data), settings, args.timeout)
            if not args.json:
                print(f"ingested {new} new abstracts", file=sys.stderr)
        job = stub.Train(request, timeout=args.timeout)
        if not args.json:
            print(f"queued job {job.id} (parent {job.parent})", file=sys.stderr)
        if args.detach:
            print(json.dumps(job_dict(job)) if args.json else job.id)
            return 0
        job = follow(stub, job.id, quiet=args.json)
    except grpc.RpcError as exc:
        return rpc_failed("train", exc)
    if args.json:
        print(json.dumps(job_dict(job)))
    else:
        print_outcome(job)
    return 0 if job.state in SUCCESS else 1


def cmd_jobs(args: argparse.Namespace, settings: CommonSettings) -> int:
    stub = _trainer(settings)
    try:
        if args.action == "list":
            jobs = stub.ListJobs(trainer_pb2.ListJobsRequest(limit=args.limit), timeout=10).jobs
            if args.json:
                print(json.dumps([job_dict(j) for j in jobs]))
                return 0
            print(f"{'JOB':<13} {'STATE':<11} {'STEP':<9} {'ADAPTER':<17} {'ROLLOUT':<9} TRIGGER")
            for j in jobs:
                print(
                    f"{j.id:<13} {j.state:<11} {f'{j.step}/{j.steps}':<9} "
                    f"{j.adapter_id or '-':<17} {j.rollout or '-':<9} {j.trigger}"
                )
        elif args.action == "show":
            job = stub.GetJob(trainer_pb2.GetJobRequest(id=args.job), timeout=10)
            print(json.dumps(job_dict(job), indent=None if args.json else 2))
        elif args.action == "watch":
            job = follow(stub, args.job, quiet=False)
            print_outcome(job)
        elif args.action == "cancel":
            job = stub.CancelJob(trainer_pb2.GetJobRequest(id=args.job), timeout=10)
            print(f"job {job.id}: {job.state}")
    except grpc.RpcError as exc:
        return rpc_failed(f"jobs {args.action}", exc)
    return 0


def cmd_policy(args: argparse.Namespace, settings: CommonSettings) -> int:
    stub = _trainer(settings)
    try:
        if args.mode:
            policy = stub.SetPolicy(trainer_pb2.SetPolicyRequest(mode=args.mode), timeout=10)
        else:
            policy = stub.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=10)
    except grpc.RpcError as exc:
        return rpc_failed("adapters policy", exc)
    if args.json:
        print(json.dumps(json_format.MessageToDict(policy, preserving_proto_field_name=True)))
        return 0
    print(f"rollout policy: {policy.mode} (decides after {policy.shadow_samples} shadow pairs)")
    if policy.watching:
        print(
            f"watching {policy.watching} in shadow: {policy.pairs} pairs, agreement "
            f"{policy.agreement:.2f}, {policy.shadow_errors} errors; feedback on differing "
            f"answers: {policy.feedback_for_candidate} for it, {policy.feedback_for_live} for live"
        )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train a LoRA adapter (gate, register, rollout policy)")
    p.add_argument("--data", help="PubMedQA-format labelled file (default: the trainer's setting)")
    p.add_argument("--limit", type=int, default=0, help="only the first N labelled items")
    p.add_argument(
        "--mode",
        choices=["knowledge", "labelled"],
        help="learn the documents ingested since --since (knowledge) or the labelled "
        "questions of --data (labelled); default: the trainer's KS_TRAINER_MODE",
    )
    p.add_argument(
        "--max-documents", type=int, default=0, help="knowledge mode: the newest N documents"
    )
    p.add_argument(
        "--since",
        help="knowledge mode: documents ingested since (ms since epoch or ISO time; "
        "default: since the parent adapter)",
    )
    p.add_argument(
        "--ingest", action="store_true", help="ingest the file's abstracts first and wait for them"
    )
    p.add_argument("--parent", help="adapter to start from (default: live; 'base' = new LoRA)")
    p.add_argument("--epochs", type=float, default=0)
    p.add_argument("--question", action="append", help="a domain question (repeatable)")
    p.add_argument("--max-tokens", type=int, default=0, help="tokens per example (0 = setting)")
    p.add_argument("--min-gain", type=float, help="gate: least accuracy gain over live")
    p.add_argument("--max-forgetting", type=float, help="gate: largest perplexity rise, percent")
    p.add_argument("--min-eval-items", type=int, help="gate: fewest eval items")
    p.add_argument(
        "--force-reason", help="why a gate looser than the service's (recorded; required then)"
    )
    p.add_argument("--no-rollout", action="store_true", help="register only; no shadow")
    p.add_argument(
        "--promote", action="store_true", help="make it live once it passes the gate (no shadow)"
    )
    p.add_argument("--reason")
    p.add_argument("--detach", action="store_true", help="queue and return the job id")
    p.add_argument("--json", action="store_true", help="no progress; the last line is the job")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("jobs", help="training jobs")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("list")
    a.add_argument("--limit", type=int, default=20)
    a.add_argument("--json", action="store_true")
    for name in ("show", "watch", "cancel"):
        a = acts.add_parser(name)
        a.add_argument("job")
        a.add_argument("--json", action="store_true")
    for action_parser in acts.choices.values():
        action_parser.set_defaults(func=cmd_jobs)


def add_policy_command(adapter_actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = adapter_actions.add_parser(
        "policy", help="show or set the rollout policy (auto: shadow, then promote or retire)"
    )
    a.add_argument("mode", nargs="?", choices=["auto", "manual"])
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_policy)
