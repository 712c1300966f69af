"""The monitor's logic without a network: event validation, building a reference, the statistics
of one window as a DriftWindow record, and decisions as RetrainRequested / KnowledgeGap records.
The live service (monitor.py) and the offline replay use the same functions."""

from __future__ import annotations

import base64
import hashlib
import math
import time
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format

from knowstream.events.v1 import events_pb2
from services.common import tracing
from services.common.kafka import BadEvent, new_header, parse_event
from services.monitor.drift import Reference, WindowStats, window_stats
from services.monitor.policy import Decision, PolicyConfig, WindowResult
from services.monitor.settings import MonitorSettings


def parse_inference(
    value: bytes | None, embedding_model: str, dimension: int | None
) -> events_pb2.InferenceEvent | None:
    """The event, None when it has no query embedding (a request without retrieval: valid, but
    nothing the monitor can compare), or BadEvent."""
    event = parse_event(value, events_pb2.InferenceEvent)
    if not event.question.strip():
        raise BadEvent("InferenceEvent without a question")
    if not event.query_embedding:
        return None
    if event.embedding_model != embedding_model:
        raise BadEvent(
            f"query embedding from model {event.embedding_model!r}; the monitor compares "
            f"{embedding_model!r} embeddings"
        )
    if dimension is not None and len(event.query_embedding) != dimension:
        raise BadEvent(
            f"query embedding has {len(event.query_embedding)} dimensions; the reference has "
            f"{dimension}"
        )
    if not all(math.isfinite(x) for x in event.query_embedding):
        raise BadEvent("query embedding has non-finite values")
    return event


def top_dense_score(event: events_pb2.InferenceEvent) -> float:
    """Best dense (cosine) score among the retrieved chunks; 0 when nothing was retrieved."""
    return max((r.dense_score for r in event.retrieved), default=0.0)


def triggers(stats: WindowStats, settings: MonitorSettings) -> list[str]:
    """Which of the configured tests call this window drifted (empty: not drifted)."""
    fired = []
    if stats.p_value < settings.monitor_p_value:
        fired.append("p_value")
    if settings.monitor_kl_threshold and stats.kl_topics > settings.monitor_kl_threshold:
        fired.append("kl_topics")
    if settings.monitor_mmd_threshold and stats.mmd2 > settings.monitor_mmd_threshold:
        fired.append("mmd2")
    return fired


def policy_config(settings: MonitorSettings) -> PolicyConfig:
    return PolicyConfig(
        consecutive=settings.monitor_consecutive,
        cooldown_windows=settings.monitor_cooldown_windows,
        gap_score=settings.monitor_gap_score,
        gap_share=settings.monitor_gap_share,
    )


def window_generator(settings: MonitorSettings, index: int) -> torch.Generator:
    """Permutations seeded by the window index: recomputing a window (after a crash, or in a
    replay) gives the same p-value."""
    return torch.Generator().manual_seed(settings.monitor_seed * 1_000_003 + index)


def build_reference(
    embeddings: np.ndarray, texts: list[str], settings: MonitorSettings
) -> tuple[str, Reference]:
    """A reference from questions and their embeddings (sampled evenly down to
    ``monitor_reference_max``); returns its content id and its precomputed statistics."""
    x = np.asarray(embeddings, dtype=np.float32)
    minimum = max(8, settings.monitor_topics)
    if len(x) < minimum:
        raise ValueError(f"a reference needs at least {minimum} questions, got {len(x)}")
    if len(x) > settings.monitor_reference_max:
        keep = np.linspace(0, len(x) - 1, settings.monitor_reference_max).round().astype(int)
        x, texts = x[keep], [texts[i] for i in keep]
    digest = hashlib.sha256(x.tobytes())
    for t in texts:
        digest.update(t.encode())
    reference = Reference.build(
        x,
        texts,
        topics=min(settings.monitor_topics, max(2, len(x) // 8)),
        vocabulary_size=settings.monitor_vocabulary,
        seed=settings.monitor_seed,
    )
    return f"ref-{digest.hexdigest()[:12]}", reference


def _share(values: list[bool]) -> float:
    return float(np.mean(values)) if values else 0.0


def _traffic_fields(
    top_scores: list[float | None],
    confidences: list[float | None],
    signals: dict[str, float],
    settings: MonitorSettings,
) -> dict[str, Any]:
    """The window's answer-quality and rollout fields (-1 where a share has no samples)."""
    scores = [s for s in top_scores if s is not None]
    conf = [c for c in confidences if c is not None]
    pairs = int(signals.get("shadow_pairs", 0))
    feedback = int(signals.get("feedback", 0))
    return {
        "low_confidence_share": _share([c < settings.monitor_low_confidence for c in conf]),
        "poorly_retrieved_share": _share([s < settings.monitor_gap_score for s in scores]),
        "mean_top_score": float(np.mean(scores)) if scores else 0.0,
        "shadow_pairs": pairs,
        "shadow_agreement": signals.get("shadow_agreement", 0.0) / pairs if pairs else -1.0,
        "feedback_count": feedback,
        "negative_feedback_share": (
            signals.get("feedback_negative", 0.0) / feedback if feedback else -1.0
        ),
    }


def compute_window(
    reference: Reference,
    reference_id: str,
    index: int,
    questions: list[str],
    embeddings: np.ndarray,
    top_scores: list[float | None],
    confidences: list[float | None],
    times_ms: list[int],
    signals: dict[str, float],
    settings: MonitorSettings,
) -> tuple[events_pb2.DriftWindow, WindowResult]:
    started = time.perf_counter()
    stats = window_stats(
        reference,
        embeddings,
        questions,
        settings.monitor_permutations,
        window_generator(settings, index),
    )
    fired = triggers(stats, settings)
    window = events_pb2.DriftWindow(
        header=new_header("monitor"),
        reference_id=reference_id,
        index=index,
        size=len(questions),
        start_ms=min(times_ms),
        end_ms=max(times_ms),
        mmd2=stats.mmd2,
        p_value=stats.p_value,
        kl_topics=stats.kl_topics,
        kl_terms=stats.kl_terms,
        drift=bool(fired),
        triggered_by=fired,
        drifted_topics=[
            events_pb2.DriftedTopic(
                topic=t,
                window_share=w,
                reference_share=r,
                terms=stats.topic_terms.get(t, []),
            )
            for t, w, r in stats.drifted_topics
        ],
        **_traffic_fields(top_scores, confidences, signals, settings),
    )
    window.compute_ms = (time.perf_counter() - started) * 1000
    result = WindowResult(
        index=index,
        drift=bool(fired),
        questions=list(questions),
        top_scores=list(top_scores),
        stats=window_to_dict(window),
    )
    return window, result


def window_to_dict(window: events_pb2.DriftWindow) -> dict[str, Any]:
    return json_format.MessageToDict(window, preserving_proto_field_name=True)


def window_from_dict(data: dict[str, Any]) -> events_pb2.DriftWindow:
    return json_format.ParseDict(data, events_pb2.DriftWindow(), ignore_unknown_fields=True)


def decision_event(
    decision: Decision, reference_id: str, live_adapter: str, settings: MonitorSettings
) -> events_pb2.DriftEvent:
    windows = [window_from_dict(s) for s in decision.stats]
    from_ms = min(w.start_ms for w in windows)
    to_ms = max(w.end_ms for w in windows)
    evidence = ", ".join(
        f"window {w.index}: p={w.p_value:.3f} MMD²={w.mmd2:.4f} KL(topics)={w.kl_topics:.3f}"
        for w in windows
    )
    terms = list(dict.fromkeys(t for w in windows for d in w.drifted_topics for t in d.terms))[:8]
    where = f" (growing topics: {', '.join(terms)})" if terms else ""
    poor = decision.poorly_retrieved_share
    drifted = f"{len(windows)} consecutive windows drifted from reference {reference_id}{where}"
    common: dict[str, Any] = dict(
        # A decision starts a trace: the job and the adapter it leads to carry it.
        header=new_header("monitor", tracing.new_trace().trace_id),
        idempotency_key=decision.idempotency_key,
        reference_id=reference_id,
        windows=windows,
        example_questions=decision.examples,
        poorly_retrieved_share=poor,
        from_ms=from_ms,
        to_ms=to_ms,
    )
    if decision.kind == "knowledge_gap":
        reason = (
            f"{drifted}; {poor:.0%} of their questions found no passage scoring ≥ "
            f"{settings.monitor_gap_score}: the documents are missing, ingest them ({evidence})"
        )
        gap = events_pb2.KnowledgeGap(reason=reason, gap_score=settings.monitor_gap_score, **common)
        return events_pb2.DriftEvent(knowledge_gap=gap)
    reason = (
        f"{drifted}; retrieval still finds passages for {1 - poor:.0%} of their questions: the "
        f"model should adapt to them ({evidence})"
    )
    retrain = events_pb2.RetrainRequested(reason=reason, live_adapter=live_adapter, **common)
    return events_pb2.DriftEvent(retrain_requested=retrain)


def new_gap(
    key: str, questions: list[str], embeddings: np.ndarray, top_scores: list[float], now_ms: int
) -> dict[str, Any]:
    """A knowledge gap to track: its poorly retrieved questions and their best scores so far."""
    return {
        "key": key,
        "created_ms": now_ms,
        "questions": questions,
        "embeddings": base64.b64encode(np.asarray(embeddings, np.float32).tobytes()).decode(),
        "best": [float(s) for s in top_scores],
        "closed_ms": 0,
    }


def cover_gap(
    gap: dict[str, Any], chunks: np.ndarray, gap_score: float, gap_share: float, now_ms: int
) -> bool:
    """Raises the gap's best score per question with newly embedded chunks (normalised vectors);
    closes it once fewer than ``gap_share`` of its questions stay below ``gap_score``. Returns
    whether anything changed."""
    if gap["closed_ms"] or not len(chunks) or not gap["questions"]:
        return False
    q = np.frombuffer(base64.b64decode(gap["embeddings"]), np.float32).reshape(
        len(gap["questions"]), -1
    )
    if q.shape[1] != chunks.shape[1]:
        return False
    best = np.maximum(np.asarray(gap["best"]), (q @ chunks.T).max(axis=1))
    changed = bool((best > np.asarray(gap["best"])).any())
    gap["best"] = [float(x) for x in best]
    if float(np.mean(best < gap_score)) < gap_share:
        gap["closed_ms"] = now_ms
        changed = True
    return changed


def gap_covered_share(gap: dict[str, Any], gap_score: float) -> float:
    best = gap["best"]
    return float(np.mean([b >= gap_score for b in best])) if best else 0.0
