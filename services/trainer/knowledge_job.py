"""The steps of a knowledge job that differ from a labelled one: the documents since the parent
adapter as data (with their probes), the training recipe (attention + MLP LoRA, several passes,
early stopping on dev probes) and the knowledge gate.

Scores go through Triton's score mode (raw prompt, the filled-in sentences as candidates), so
the gate measures what is served; each (adapter, probe) is scored once and recalled from Redis
after (adapters are content-addressed, the base model never changes).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from knowstream.trainer.v1 import trainer_pb2
from services.common.adapters import BASE
from services.common.kafka import now_ms
from services.common.knowledge import (
    KnowledgeThresholds,
    Limits,
    ProbeSet,
    ScoreFn,
    TierScores,
    decide_knowledge,
    knowledge_metrics,
    score_tiers,
)
from services.common.probes import Document
from services.llm.llm import LLMRequest
from services.trainer.augment import Augmentation
from services.trainer.knowledge_data import (
    KnowledgeData,
    KnowledgeRecipe,
    build_knowledge_data,
    documents_from_chunks,
    known_documents,
    recent_provenance,
)
from services.trainer.recent import read_recent_chunks
from services.trainer.settings import TrainerSettings
from services.trainer.store import TrainerStore

PROBES_FILE = "probes.json"
DEV_FILE = "dev-probes.json"
# Documents of registered adapters, so a child can replay its ancestors' documents.
DOCUMENTS_DIR = "documents"


def triton_logprobs(llm: Any, timeout_s: float) -> ScoreFn:
    """Score mode through Triton on a raw prompt: the log-probability of each candidate."""

    async def score(prompt: str, candidates: list[str], adapter: str) -> list[float]:
        generation = await llm.generate(
            LLMRequest(
                prompt=prompt,
                adapter=adapter,
                max_new_tokens=1,
                candidates=candidates,
                raw_prompt=True,
            ),
            timeout_s,
            patient=True,  # shed beside live traffic: wait for room
        )
        return list(generation.candidate_logprobs)

    return score


def remembered(score: ScoreFn, store: TrainerStore) -> ScoreFn:
    """``score`` with each (adapter, prompt, candidates) answered once: a later job recalls the
    base model's and the parent's scores of a probe instead of asking Triton again."""

    async def recall(prompt: str, candidates: list[str], adapter: str) -> list[float]:
        key = hashlib.sha256("\x00".join([prompt, *candidates]).encode()).hexdigest()[:24]
        (found,) = await store.recall_scores(adapter, [key])
        if found is not None and len(found) == len(candidates):
            return found
        result = await score(prompt, candidates, adapter)
        await store.remember_scores(adapter, {key: result})
        return result

    return recall


def recipe_of(s: TrainerSettings) -> KnowledgeRecipe:
    return KnowledgeRecipe(
        augmentation=Augmentation(
            shuffles=s.trainer_knowledge_shuffles,
            restatements=s.trainer_knowledge_restatements,
            qa_pairs=s.trainer_knowledge_qa,
            seed=s.trainer_seed,
        ),
        control_share=s.trainer_control_share,
        max_documents=s.trainer_knowledge_max_documents,
        probes_per_document=s.trainer_probes_per_document,
        limits=Limits(
            max_per_tier=s.trainer_probes_per_tier,
            dev_share=s.trainer_dev_share,
            retention_margin=s.trainer_retention_margin,
            seed=s.trainer_seed,
        ),
        replay_share=s.trainer_knowledge_replay_share,
        span_loss=s.trainer_knowledge_span_loss,
        general_chars=s.trainer_retention_general_chars,
        seed=s.trainer_seed,
    )


def since_of(request: trainer_pb2.TrainRequest, parent_created_ms: int, hours: float) -> int:
    """Where a knowledge job's documents start: the request's time, else when the parent was
    registered (the base model: everything), never more than ``hours`` back."""
    floor = now_ms() - int(hours * 3600_000)
    since = request.since_ms or parent_created_ms
    return max(since, floor)


def save_documents(directory: Path, name: str, docs: list[Document]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": d.id, "text": d.text, "terms": list(d.terms)} for d in docs]
    tmp = directory / f"{name}.tmp"
    tmp.write_text(json.dumps(rows), encoding="utf-8")
    tmp.replace(directory / f"{name}.json")


def load_documents(directory: Path, name: str) -> list[Document]:
    path = directory / f"{name}.json"
    if not name or not path.exists():
        return []
    return [
        Document(id=r["id"], text=r["text"], terms=tuple(r.get("terms", ())))
        for r in json.loads(path.read_text(encoding="utf-8"))
    ]


async def assemble(
    settings: TrainerSettings,
    job: trainer_pb2.Job,
    job_dir: Path,
    parent_created_ms: int,
    ancestors: list[str],
    score: ScoreFn,
) -> KnowledgeData:
    """Reads the new documents, builds probes and training text, and writes the probe set and
    the dev probes next to the dataset. ``ancestors`` are the dataset hashes up the parent's
    lineage: their documents are the older ones (replay and retention)."""
    since = since_of(job.request, parent_created_ms, settings.trainer_recent_hours)
    read = await asyncio.to_thread(
        read_recent_chunks, settings.kafka_bootstrap, settings.topic_chunks, since
    )
    known = await asyncio.to_thread(
        known_documents, job.request.labelled_data or settings.trainer_labelled_data
    )
    new_docs = documents_from_chunks(read.chunks, known)
    documents_dir = settings.trainer_dir / DOCUMENTS_DIR
    older: dict[str, Document] = {}
    for digest in ancestors:
        for d in load_documents(documents_dir, digest):
            older.setdefault(d.id, d)
    new_ids = {d.id for d in new_docs}
    older_docs = [d for d in older.values() if d.id not in new_ids]
    provenance = recent_provenance(read.chunks, since)
    provenance["knowledge_unreadable_records"] = read.unreadable
    recipe = recipe_of(settings)
    if job.request.max_documents:
        recipe = replace(recipe, max_documents=job.request.max_documents)
    data = await build_knowledge_data(
        new_docs,
        older_docs,
        job.parent,
        score,
        recipe,
        provenance,
        settings.trainer_gate_concurrency,
    )
    # Documents this adapter learned plus those it replays are what its children replay.
    save_documents(documents_dir, data.dataset.content_hash, data.trained + older_docs)
    (job_dir / PROBES_FILE).write_text(json.dumps(data.probes.to_json()), encoding="utf-8")
    (job_dir / DEV_FILE).write_text(
        json.dumps([p.to_json() for p in data.probes.dev]), encoding="utf-8"
    )
    return data


def load_probes(job_dir: Path) -> ProbeSet:
    return ProbeSet.from_json(json.loads((job_dir / PROBES_FILE).read_text(encoding="utf-8")))


def thresholds(settings: TrainerSettings, g: trainer_pb2.GateOverrides) -> KnowledgeThresholds:
    s = settings
    return KnowledgeThresholds(
        min_lower_bound=(
            g.min_lower_bound if g.HasField("min_lower_bound") else s.trainer_gate_min_lower_bound
        ),
        min_retention=g.min_retention
        if g.HasField("min_retention")
        else s.trainer_gate_min_retention,
        max_forgetting_pct=(
            g.max_forgetting_pct
            if g.HasField("max_forgetting_pct")
            else s.trainer_gate_max_forgetting_pct
        ),
        min_probes=s.trainer_gate_min_probes,
    )


def _tiers(scores: TierScores) -> trainer_pb2.TierAccuracy:
    a = scores.accuracy
    return trainer_pb2.TierAccuracy(m=a("M"), p=a("P"), c=a("C"), r=a("R"))


async def gate(
    settings: TrainerSettings,
    job: trainer_pb2.Job,
    job_dir: Path,
    adapter_id: str,
    summary: dict[str, Any],
    score: ScoreFn,
) -> tuple[bool, list[str], trainer_pb2.GateResult]:
    """Scores the candidate (and the parent, for the record) on every tier and decides."""
    probes = load_probes(job_dir)
    t = time.perf_counter()
    adapter = await score_tiers(probes, adapter_id, score, settings.trainer_gate_concurrency)
    parent = await score_tiers(probes, job.parent or BASE, score, settings.trainer_gate_concurrency)
    perplexities = (
        float(summary.get("base_perplexity", 0)),
        float(summary.get("perplexity", 0)),
    )
    metrics = knowledge_metrics(adapter, perplexities, settings.trainer_seed)
    passed, reasons = decide_knowledge(metrics, thresholds(settings, job.request.gate))
    reasons.append(f"probes scored in {time.perf_counter() - t:.1f}s")
    result = trainer_pb2.GateResult(
        passed=passed,
        reasons=reasons,
        eval_items=sum(metrics.sizes.values()),
        live_adapter=job.parent,
        base_perplexity=metrics.base_perplexity,
        perplexity=metrics.perplexity,
        forgetting_pct=metrics.forgetting_pct,
        knowledge=trainer_pb2.KnowledgeGateResult(
            adapter=_tiers(adapter),
            parent=_tiers(parent),
            m_probes=metrics.sizes["M"],
            p_probes=metrics.sizes["P"],
            c_probes=metrics.sizes["C"],
            r_probes=metrics.sizes["R"],
            dev_probes=len(probes.dev),
            m_lower_bound=metrics.lower_bounds["M-C"],
            p_lower_bound=metrics.lower_bounds["P-C"],
            probe_set=probes.digest,
            dev_curve=[float(x) for x in summary.get("dev_accuracy", [])],
            best_pass=int(summary.get("best_pass", 0)),
        ),
    )
    return passed, reasons, result
