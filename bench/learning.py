"""Does the loop learn what the stream brought and keep what it knew? Through the running stack
(`make up`):

    .venv/bin/python -m bench.learning [--data FILE] [--batches 4] [--batch-size 50] --json

A stream of batches of abstracts from FILE (PubMedQA JSON) is ingested batch by batch; after
each batch the trainer trains one knowledge adapter on what it brought (`Train` in knowledge
mode, documents since the batch started, from the live adapter, promoted when it passes so the
next batch trains from it). Per batch: tiers M/P/C/R (to-learn probes against the parent, as
the gate built them) for the base model, the adapter, retrieval (the best passage before each
probe, base model) and retrieval + adapter; whether it was registered; the cycle's wall time
(dataset, training, gate). After the last batch: batch 1's tier-M gain kept by the final
adapter, and FUAR (forgotten / (updated + acquired), CKL's measure: retention probes lost and
batch-1 facts lost, over to-learn facts acquired).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from bench.common import DEFAULT_DATA, load_pubmedqa, searchable, stubs
from knowstream.infer.v1 import infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2
from knowstream.retrieve.v1 import retrieve_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.documents import pubmedqa_document
from services.cli.knowledge import infer_score, with_retrieval
from services.common.clients import channel, sync_channel
from services.common.importdir import stage_for_import
from services.common.knowledge import ProbeSet, ScoreFn, TierScores, score_tiers
from services.common.settings import CommonSettings

if TYPE_CHECKING:
    from services.trainer.settings import TrainerSettings


def ingest_batch(settings: CommonSettings, items: dict[str, Any], timeout_s: float) -> float:
    """Ingests and waits until every abstract is searchable; returns the seconds it took."""
    ingest, retrieve = stubs(settings)
    started = time.monotonic()
    docs = [pubmedqa_document(k, v) for k, v in items.items()]
    reply = ingest.IngestDocuments(ingest_pb2.IngestDocumentsRequest(documents=docs), timeout=120)
    if reply.rejected:
        raise SystemExit(f"{reply.rejected} abstracts rejected")
    waiting = set(items)
    while waiting and time.monotonic() - started < timeout_s:
        waiting -= searchable(retrieve, sorted(waiting))
        if waiting:
            time.sleep(1)
    return round(time.monotonic() - started, 1)


def train(
    settings: CommonSettings, since_ms: int, data: Path, batch: int, passes: float
) -> trainer_pb2.Job:
    trainer = trainer_pb2_grpc.TrainerServiceStub(
        sync_channel(settings.address(settings.trainer_port))
    )
    job = trainer.Train(
        trainer_pb2.TrainRequest(
            mode=trainer_pb2.TRAIN_MODE_KNOWLEDGE,
            since_ms=since_ms,
            parent="live",
            labelled_data=stage_for_import(data, settings.import_root()),
            promote=True,
            epochs=passes,
            reason=f"bench.learning batch {batch}",
        ),
        timeout=60,
    )
    last = ""
    for state in trainer.WatchJob(trainer_pb2.GetJobRequest(id=job.id), timeout=3 * 3600):
        line = f"batch {batch}: {state.state} {state.step}/{state.steps}"
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        job = state
    return job


def job_probes(trainer_dir: Path, job: trainer_pb2.Job) -> ProbeSet:
    """The probe set the gate decided on (the trainer keeps it in the job's directory)."""
    path = trainer_dir / "jobs" / job.id / "probes.json"
    return ProbeSet.from_json(json.loads(path.read_text(encoding="utf-8")))


def sample(probes: ProbeSet, per_tier: int) -> ProbeSet:
    return ProbeSet(tiers={t: ps[:per_tier] for t, ps in probes.tiers.items()})


def gate_scores(job: trainer_pb2.Job) -> tuple[dict[str, float], dict[str, float]]:
    """The adapter's and the parent's closed-book tier accuracies as the gate measured them (the
    same probes through the same score mode: not scored twice)."""
    k = job.gate.knowledge

    def tiers(t: trainer_pb2.TierAccuracy) -> dict[str, float]:
        return {"M": round(t.m, 4), "P": round(t.p, 4), "C": round(t.c, 4), "R": round(t.r, 4)}

    return tiers(k.adapter), tiers(k.parent)


async def measure(
    settings: CommonSettings,
    job: trainer_pb2.Job,
    probes: ProbeSet,
    retrieval_probes: int,
    parent_is_base: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """M/P/C/R of base, adapter, retrieval and retrieval + adapter on this batch's probes, and
    the adapter's per-probe correctness on M and R (for what later batches keep)."""
    infer_channel = channel(settings.address(settings.infer_port))
    retrieve_channel = channel(settings.address(settings.retrieve_port))
    adapter_tiers, parent_tiers = gate_scores(job)
    try:
        score: ScoreFn = infer_score(infer_pb2_grpc.InferServiceStub(infer_channel), 600)
        rag = with_retrieval(score, retrieve_pb2_grpc.RetrieveServiceStub(retrieve_channel), 1, 60)
        adapter = job.adapter_id if job.state == "registered" else ""
        few = sample(probes, retrieval_probes)
        mr = ProbeSet(tiers={"M": probes.tiers["M"], "R": probes.tiers["R"]})
        # A rejected adapter left the store: its closed-book figures are the gate's.
        correct = (await score_tiers(mr, adapter, score)).correct if adapter else {}
        base = (
            parent_tiers if parent_is_base else (await score_tiers(probes, "base", score)).summary()
        )
        runs = {"retrieval": await score_tiers(few, "base", rag)}
        if adapter:
            runs["retrieval_adapter"] = await score_tiers(few, adapter, rag)
    finally:
        await infer_channel.close(None)
        await retrieve_channel.close(None)
    out: dict[str, dict[str, Any]] = {}
    for tier in probes.tiers:
        out[tier] = {"base": base[tier], "adapter": adapter_tiers[tier]}
        out[tier].update({name: round(s.accuracy(tier), 4) for name, s in runs.items()})
        out[tier].setdefault("retrieval_adapter", None)
        out[tier]["n"] = len(probes.tiers[tier])
        out[tier]["n_retrieval"] = len(few.tiers[tier])
    return out, correct


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--offset", type=int, default=0, help="first item of the file to stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrieval-probes", type=int, default=25, help="per tier")
    ap.add_argument(
        "--passes", type=float, default=0, help="most passes per job (0: the trainer's setting)"
    )
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def run_batch(
    settings: TrainerSettings,
    items: dict[str, Any],
    batch: int,
    data: Path,
    passes: float,
    retrieval_probes: int,
) -> tuple[dict[str, Any], trainer_pb2.Job, ProbeSet | None, dict[str, list[int]]]:
    """Ingests one batch, trains on it and measures the result: the batch's row, its job and,
    when the job finished (registered or rejected), the gate's probes and the adapter's
    per-probe correctness on M and R."""
    since = int(time.time() * 1000) - 500
    ingest_s = ingest_batch(settings, items, 300)
    started = time.monotonic()
    job = train(settings, since, data, batch, passes)
    cycle_s = round(time.monotonic() - started, 1)
    timings = json.loads(job.timings_json or "{}")
    row: dict[str, Any] = {"batch": batch, "job": job.id, "state": job.state}
    row["registered"] = job.state == "registered"
    row["cycle_s"] = cycle_s
    row["ingest_s"] = ingest_s
    row["timings"] = timings
    row["gate"] = list(job.gate.reasons)
    if job.state not in ("registered", "rejected"):
        row["error"] = job.error
        return row, job, None, {}
    probes = job_probes(settings.trainer_dir, job)
    figures, correct = asyncio.run(
        measure(settings, job, probes, retrieval_probes, job.parent == "base")
    )
    row.update(figures)
    row["dev_curve"] = list(job.gate.knowledge.dev_curve)
    return row, job, probes, correct


def final_correct(settings: CommonSettings, probes: ProbeSet, adapter: str) -> list[int]:
    """The final adapter's per-probe correctness on batch 1's tier-M probes."""
    infer_channel = channel(settings.address(settings.infer_port))

    async def final() -> TierScores:
        try:
            score = infer_score(infer_pb2_grpc.InferServiceStub(infer_channel), 300)
            return await score_tiers(ProbeSet(tiers={"M": probes.tiers["M"]}), adapter, score)
        finally:
            await infer_channel.close(None)

    try:
        return asyncio.run(final()).correct["M"]
    except grpc.RpcError as exc:
        raise SystemExit(f"scoring batch 1 with the final adapter failed: {exc}") from exc


def main() -> None:
    args = parse_args()
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings()
    data = load_pubmedqa(args.data)
    keys = list(data)[args.offset :]
    batches: list[dict[str, Any]] = []
    first_probes: ProbeSet | None = None
    first_correct: list[int] = []
    acquired = forgotten = 0
    adapter = "base"
    for b in range(args.batches):
        items = {k: data[k] for k in keys[b * args.batch_size : (b + 1) * args.batch_size]}
        row, job, probes, correct = run_batch(
            settings, items, b + 1, args.data, args.passes, args.retrieval_probes
        )
        if probes is None:
            batches.append(row)
            continue
        if row["registered"]:
            adapter = job.adapter_id
            acquired += sum(correct.get("M", []))
            forgotten += len(probes.tiers["R"]) - sum(correct.get("R", []))
            if first_probes is None:
                first_probes = probes
                first_correct = list(correct["M"])
        batches.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "gate"}), file=sys.stderr)
    kept = None
    if first_probes is not None and args.batches > 1 and adapter != "base":
        later = final_correct(settings, first_probes, adapter)
        gained = sum(first_correct)
        still = sum(1 for a, z in zip(first_correct, later, strict=True) if a and z)
        kept = round(still / gained, 4) if gained else None
        forgotten += gained - still
    result = {
        "batches": batches,
        "batch1_kept": kept,
        "fuar": round(forgotten / acquired, 4) if acquired else None,
        "forgotten": forgotten,
        "acquired": acquired,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "passes": args.passes,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
