"""``make demo``: the loop end to end on the running stack (``make up``), one progress line per
stage. It ingests the oncology abstracts of the labelled PubMedQA file, asks their questions
(score mode: yes/no/maybe) until the monitor has a reference and a steady window, then shifts
the traffic to cardiology, whose abstracts are missing: the monitor raises a knowledge gap; the
cardiology abstracts are ingested, the gap closes and the monitor asks for a retrain; the
trainer learns them (knowledge mode), gates, puts the adapter in shadow; more traffic gives the
policy its shadow pairs and it promotes (or retires) the adapter. It ends with the adapter's
gains on its knowledge probes, the drift report PNG and one JSON line of every figure.

    .venv/bin/python -m services.cli.demo [--data FILE] [--out drift.png]

A gate that refuses the adapter is reported as such and the demo goes on to the report: that is
the platform working. The demo needs a fresh stack (``make clean-data``): a live adapter or
earlier jobs would change what the trainer learns from.

Over 400 lines because the demo is one story told in stages, each a short function, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2
from knowstream.monitor.v1 import monitor_pb2
from knowstream.trainer.v1 import trainer_pb2
from services.cli import stubs
from services.cli.demo_plan import (
    Plan,
    Stages,
    gate_figures,
    make_plan,
    shadow_questions,
    window_text,
)
from services.cli.documents import ensure_ingested
from services.cli.drift import cmd_report
from services.cli.trace import read_records
from services.common.settings import REPO_ROOT, CommonSettings

CALLER = "demo"
CANDIDATES = ["yes", "no", "maybe"]
T = TypeVar("T")


class Stopped(Exception):
    """A stage could not finish (what it waited for did not come): the demo reports it."""


@dataclass
class Demo:
    settings: CommonSettings
    data: dict[str, Any]
    wait_s: float
    concurrency: int
    stages: Stages = field(default_factory=Stages)
    result: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.ingest, self.retrieve = stubs.ingest(s), stubs.retrieve(s)
        self.infer, self.admin = stubs.infer(s), stubs.admin(s)
        self.monitor, self.trainer = stubs.monitor(s), stubs.trainer(s)

    def status(self, windows: int = 0) -> monitor_pb2.DriftStatus:
        return self.monitor.GetDriftStatus(
            monitor_pb2.GetDriftStatusRequest(windows=windows), timeout=30
        )

    def until(self, what: str, probe: Callable[[], T | None], every_s: float = 1.0) -> T:
        """Polls ``probe`` until it answers something; Stopped after ``wait_s``."""
        deadline = time.monotonic() + self.wait_s
        while True:
            found = probe()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise Stopped(f"{what}: nothing after {self.wait_s:.0f}s")
            time.sleep(every_s)

    def ask(self, ids: list[str]) -> int:
        """Asks the items' questions (score mode), ``concurrency`` at a time; returns how many
        were answered, after the monitor has seen them (windows are in arrival order, so a
        phase must be in before the next begins)."""
        seen = self.status().questions_seen

        def one(key: str) -> bool:
            request = infer_pb2.AskRequest(
                question=self.data[key]["QUESTION"], candidates=CANDIDATES, caller=CALLER
            )
            try:
                self.infer.Ask(request, timeout=120)
                return True
            except grpc.RpcError as exc:
                self.stages.note(f"ask failed: {exc.code().name}: {exc.details()}")
                return False

        with ThreadPoolExecutor(self.concurrency) as pool:
            answered = sum(pool.map(one, ids))
        want = seen + answered
        self.until(
            "the monitor seeing the questions",
            lambda: True if self.status().questions_seen >= want else None,
            0.5,
        )
        return answered


def check_stack(d: Demo) -> dict[str, Any]:
    d.stages.begin("stack")
    status = d.status()
    policy = d.trainer.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=30)
    rollout = d.admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=30)
    jobs = d.trainer.ListJobs(trainer_pb2.ListJobsRequest(limit=1), timeout=30).jobs
    if jobs or rollout.live != "base":
        raise SystemExit(
            f"the demo needs a fresh stack (live adapter {rollout.live}, {len(jobs)} jobs): "
            "run `make clean-data` first"
        )
    if policy.mode != "auto":
        raise SystemExit(f"the rollout policy is {policy.mode!r}: the demo needs auto")
    s = status.settings
    figures = {
        "window": s.window,
        "consecutive": s.consecutive,
        "p_value": round(s.p_value, 4),
        "gap_score": round(s.gap_score, 3),
        "shadow_samples": policy.shadow_samples,
    }
    d.stages.end(
        f"serving; monitor window {s.window}, drift when p < {s.p_value:g} in {s.consecutive} "
        f"windows in a row; policy auto, {policy.shadow_samples} shadow pairs",
        **figures,
    )
    return figures


def ingest_corpus(d: Demo, ids: list[str], stage: str, what: str) -> None:
    d.stages.begin(stage)
    new = ensure_ingested({k: d.data[k] for k in ids}, d.ingest, d.retrieve, d.wait_s)
    d.stages.end(f"{len(ids)} {what} abstracts searchable ({new} new)", documents=len(ids))


def windows_of(d: Demo, reference: str) -> list[events_pb2.DriftWindow]:
    return sorted(
        (w for w in d.status(windows=50).windows if w.reference_id == reference),
        key=lambda w: w.index,
    )


def traffic(d: Demo, plan: Plan) -> str:
    d.stages.begin("traffic")
    asked = d.ask(plan.reference)
    info = d.monitor.SetReference(
        monitor_pb2.SetReferenceRequest(
            recent=asked,
            description="demo: oncology questions",
            restart_windows=True,
        ),
        timeout=60,
    )
    d.ask(plan.steady)
    steady = d.until("the steady window", lambda: windows_of(d, info.id) or None)
    w = steady[-1]
    d.stages.end(
        f"{asked} oncology questions as the reference {info.id}; {window_text(w)}",
        reference=info.id,
        steady_p_value=round(w.p_value, 4),
        steady_mmd2=round(w.mmd2, 5),
        steady_drift=w.drift,
    )
    return info.id


def shift(d: Demo, plan: Plan, reference: str) -> events_pb2.DriftEvent:
    d.stages.begin("shift")
    d.ask(plan.shifted)

    def event() -> events_pb2.DriftEvent | None:
        events = d.monitor.ListEvents(monitor_pb2.ListEventsRequest(limit=10), timeout=30).events
        return next((e for e in events if _inner(e).reference_id == reference), None)

    found = d.until("a drift event", event)
    inner = _inner(found)
    kind = "KnowledgeGap" if found.HasField("knowledge_gap") else "RetrainRequested"
    stats = [
        {"window": w.index, "p_value": round(w.p_value, 4), "mmd2": round(w.mmd2, 5)}
        for w in inner.windows
    ]
    figures = ", ".join(window_text(w) for w in inner.windows)
    d.stages.end(
        f"{len(plan.shifted)} cardiology questions: {figures}; {kind} {inner.idempotency_key} "
        f"({inner.poorly_retrieved_share:.0%} retrieved poorly)",
        event=kind,
        key=inner.idempotency_key,
        windows=stats,
        poorly_retrieved_share=round(inner.poorly_retrieved_share, 4),
    )
    return found


def _inner(event: events_pb2.DriftEvent) -> Any:
    return event.knowledge_gap if event.HasField("knowledge_gap") else event.retrain_requested


def close_gap(d: Demo, plan: Plan, event: events_pb2.DriftEvent) -> str:
    """Ingests the missing abstracts; returns the trigger of the job that should follow."""
    ingest_corpus(d, plan.missing, "ingest missing", "cardiology")
    if not event.HasField("knowledge_gap"):
        # Retrieval found passages for the shifted questions: the monitor asked for a retrain
        # at once, there is no gap to close.
        return f"retrain:{event.retrain_requested.idempotency_key}"
    key = event.knowledge_gap.idempotency_key
    d.stages.begin("gap closed")

    def closed() -> monitor_pb2.KnowledgeGapStatus | None:
        return next((g for g in d.status().gaps if g.idempotency_key == key and g.closed_ms), None)

    gap = d.until("the knowledge gap closing", closed)
    d.stages.end(
        f"gap {key} closed: {gap.covered_share:.0%} of its {len(gap.questions)} questions "
        f"find a passage; RetrainRequested {key}:closed",
        gap=key,
        covered_share=round(gap.covered_share, 4),
    )
    return f"retrain:{key}:closed"


def find_job(d: Demo, trigger: str) -> trainer_pb2.Job:
    d.stages.begin("retrain")

    def job() -> trainer_pb2.Job | None:
        jobs = d.trainer.ListJobs(trainer_pb2.ListJobsRequest(limit=20), timeout=30).jobs
        return next((j for j in jobs if j.trigger == trigger), None)

    found = d.until(f"a job for {trigger}", job)
    d.stages.end(f"trainer job {found.id} from {trigger} (parent {found.parent})", job=found.id)
    return found


def train(d: Demo, started: trainer_pb2.Job, missing: set[str]) -> trainer_pb2.Job:
    d.stages.begin("train")
    state, quarter, job = "", -1, started
    for job in d.trainer.WatchJob(trainer_pb2.GetJobRequest(id=started.id), timeout=3 * 3600):
        step = 4 * job.step // job.steps if job.steps else -1
        if job.state != state or (job.state == "training" and step != quarter):
            detail = f" step {job.step}/{job.steps} loss {job.loss:.3f}" if job.steps else ""
            d.stages.note(f"{job.state}{detail}")
            state, quarter = job.state, step
    knowledge = json.loads(job.dataset_json or "{}").get("knowledge", {})
    trained = knowledge.get("trained_documents", [])
    control = knowledge.get("control_documents", [])
    others = [x for x in trained + control if x not in missing]
    timings = json.loads(job.timings_json or "{}")
    d.stages.end(
        f"{job.state}: learned {len(trained)} documents ({len(control)} held out as control; "
        f"{len(others)} not from the missing topic), {job.steps} steps, dev-probe accuracy "
        f"{[round(x, 3) for x in job.gate.knowledge.dev_curve]}; {timings}",
        ok=job.state in ("registered", "rejected"),
        state=job.state,
        trained_documents=len(trained),
        control_documents=len(control),
        other_documents=len(others),
        steps=job.steps,
        timings=timings,
        error=job.error[-300:],
    )
    return job


def gate(d: Demo, job: trainer_pb2.Job) -> dict[str, Any]:
    d.stages.begin("gate")
    figures = gate_figures(job)
    verdict = "passed: registered" if job.gate.passed else "REFUSED the adapter"
    d.stages.end(f"{verdict}; " + "; ".join(job.gate.reasons), **figures)
    return figures


def rollout_event(settings: CommonSettings, job_id: str) -> events_pb2.TrainingEvent | None:
    """The policy's decision on the job's adapter (promoted or retired) with its reasons, from
    the trainer's topic (the job record keeps the outcome, the event the reasons)."""
    found = None
    for r in read_records(settings, [settings.topic_training], None, 20):
        if r.key == job_id.encode():
            event = events_pb2.TrainingEvent.FromString(r.value)
            if event.kind in ("promoted", "retired"):
                found = event
    return found


def shadow(d: Demo, plan: Plan, job: trainer_pb2.Job, samples: int) -> dict[str, Any]:
    """Traffic while the adapter is in shadow, until the policy decides."""
    d.stages.begin("shadow")
    d.until("the hand-over to shadow", lambda: _rollout(d, job.id) or None)
    asked, pairs, agreement = 0, 0, 0.0
    deadline = time.monotonic() + d.wait_s
    # A few more questions than pairs needed: a mirror is skipped when Triton is busy.
    batch = shadow_questions(plan, 4 * samples)
    while _rollout(d, job.id) == "shadow" and time.monotonic() < deadline:
        ids = batch[asked % len(batch) :][: d.concurrency]
        asked += d.ask(ids)
        policy = d.trainer.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=30)
        if policy.watching == job.adapter_id:
            pairs, agreement = policy.pairs, policy.agreement
    outcome = _rollout(d, job.id)
    if outcome not in ("promoted", "retired"):
        raise Stopped(f"rollout {outcome!r} after {asked} questions ({pairs} shadow pairs)")
    event = d.until("the decision event", lambda: rollout_event(d.settings, job.id), 2.0)
    live = d.admin.GetRollout(infer_pb2.GetRolloutRequest(), timeout=30).live
    figures = {
        "rollout": outcome,
        "shadow_pairs": event.shadow_pairs or pairs,
        "shadow_agreement": round(event.shadow_agreement or agreement, 4),
        "questions": asked,
        "live": live,
        "reasons": list(event.reasons),
    }
    d.stages.end(
        f"{outcome} after {figures['shadow_pairs']} shadow pairs (agreement with live "
        f"{figures['shadow_agreement']:.2f}); live is now {live}: " + "; ".join(event.reasons),
        ok=outcome == "promoted",
        **figures,
    )
    return figures


def _rollout(d: Demo, job_id: str) -> str:
    return d.trainer.GetJob(trainer_pb2.GetJobRequest(id=job_id), timeout=30).rollout


def report(d: Demo, out: Path) -> None:
    d.stages.begin("report")
    args = argparse.Namespace(out=str(out), windows=200, timeout=60)
    code = cmd_report(args, d.settings)
    d.stages.end(f"drift report {out}", ok=code == 0, png=str(out))


def run(d: Demo, out: Path) -> None:
    settings = check_stack(d)
    plan = make_plan(d.data, settings["window"], settings["consecutive"], d.result["reference"])
    d.result["plan"] = {k: len(v) for k, v in vars(plan).items()}
    ingest_corpus(d, plan.corpus, "ingest corpus", "oncology")
    reference = traffic(d, plan)
    event = shift(d, plan, reference)
    job = find_job(d, close_gap(d, plan, event))
    job = train(d, job, set(plan.missing))
    if job.state not in ("registered", "rejected"):
        raise Stopped(f"job {job.id} {job.state}: {job.error[-300:]}")
    figures = gate(d, job)
    d.result["gains"] = figures["gains"]
    d.result["gate_passed"] = figures["passed"]
    if job.state == "registered":
        d.result["rollout"] = shadow(d, plan, job, settings["shadow_samples"])["rollout"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared/data/pubmedqa/labeled.json"
    )
    ap.add_argument("--reference", type=int, default=40, help="questions in the reference")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / ".run" / "demo-drift.png")
    ap.add_argument("--wait", type=float, default=600, help="longest wait of one stage, seconds")
    ap.add_argument("--concurrency", type=int, default=4, help="questions in flight")
    args = ap.parse_args(argv)
    d = Demo(
        CommonSettings(),
        json.loads(args.data.read_text(encoding="utf-8")),
        args.wait,
        args.concurrency,
    )
    d.result["reference"] = args.reference
    outcome = "done"
    try:
        run(d, args.out)
    except (Stopped, grpc.RpcError, ValueError) as exc:
        what = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else exc
        d.stages.end(f"stopped: {what}", ok=False)
        outcome = f"stopped: {what}"
    report(d, args.out)
    if "gains" in d.result:
        g = d.result["gains"]
        print(
            "knowledge gains of the adapter over its parent (to-learn probes; R: retention): "
            + ", ".join(f"{t} {v:+.3f}" for t, v in g.items())
        )
    d.result.update(outcome=outcome, seconds=round(d.stages.elapsed(), 1), stages=d.stages.done)
    print(json.dumps(d.result))
    return 0 if outcome == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
