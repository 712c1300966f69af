"""The demo's pure parts (services/cli/demo.py runs them against the stack): which PubMedQA items
are the first corpus and which the missing topic (by MeSH terms, in file order, so every run
picks the same), which questions make the reference, the steady window and the shifted windows,
and the stage bookkeeping that prints one progress line per stage."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from knowstream.events.v1 import events_pb2
from knowstream.trainer.v1 import trainer_pb2

# MeSH terms of the two topics. An item tagged with both is left out of both, so the shift is a
# clean one (two such items in the labelled file).
ONCOLOGY = re.compile(
    r"neoplasm|carcinom|cancer|tumou?r|lymphoma|leuka?emi|melanoma|sarcoma|metasta|glioma|"
    r"myeloma",
    re.IGNORECASE,
)
CARDIOLOGY = re.compile(
    r"heart|cardi|myocard|coronary|atrial|arrhythm|aort|hypertension|angina|ventricular|"
    r"stroke|vascular|arter",
    re.IGNORECASE,
)


def topic_ids(data: dict[str, Any], topic: re.Pattern[str], other: re.Pattern[str]) -> list[str]:
    """Ids of the items with a MeSH term of ``topic`` and none of ``other``, in file order."""
    out = []
    for key, item in data.items():
        meshes = item.get("MESHES", [])
        if any(topic.search(m) for m in meshes) and not any(other.search(m) for m in meshes):
            out.append(str(key))
    return out


@dataclass(frozen=True)
class Plan:
    # Abstracts ingested first (the whole first topic: what retrieval knows).
    corpus: list[str]
    # Items whose questions are the traffic: the reference, one steady window, then the
    # shifted windows (whose abstracts are the missing documents, ingested after the gap).
    reference: list[str]
    steady: list[str]
    shifted: list[str]

    @property
    def missing(self) -> list[str]:
        return self.shifted


def make_plan(data: dict[str, Any], window: int, consecutive: int, reference: int) -> Plan:
    """The split for a monitor of ``window`` questions per window that raises an event after
    ``consecutive`` drifted windows: ``reference`` + one window of first-topic questions, then
    ``consecutive`` windows of missing-topic questions. ValueError when the file is too small."""
    first = topic_ids(data, ONCOLOGY, CARDIOLOGY)
    missing = topic_ids(data, CARDIOLOGY, ONCOLOGY)
    if len(first) < reference + window:
        raise ValueError(f"{len(first)} oncology items, {reference + window} needed")
    if len(missing) < consecutive * window:
        raise ValueError(f"{len(missing)} cardiology items, {consecutive * window} needed")
    return Plan(
        corpus=first,
        reference=first[:reference],
        steady=first[reference : reference + window],
        shifted=missing[: consecutive * window],
    )


def shadow_questions(plan: Plan, n: int) -> list[str]:
    """``n`` item ids whose questions are the traffic while the candidate is in shadow: both
    topics, alternating (users go on asking about both)."""
    mixed = [x for pair in zip(plan.steady, plan.shifted, strict=False) for x in pair]
    pool = mixed or plan.steady or plan.shifted
    return [pool[i % len(pool)] for i in range(n)] if pool else []


def gains(adapter: dict[str, float], parent: dict[str, float]) -> dict[str, float]:
    """Per tier, the adapter's accuracy minus its parent's (the parent scores 0 on the
    to-learn tiers M, P and C by construction)."""
    return {t: round(adapter[t] - parent.get(t, 0.0), 4) for t in adapter}


def tiers(t: trainer_pb2.TierAccuracy) -> dict[str, float]:
    return {"M": round(t.m, 4), "P": round(t.p, 4), "C": round(t.c, 4), "R": round(t.r, 4)}


def gate_figures(job: trainer_pb2.Job) -> dict[str, Any]:
    """What the knowledge gate measured and decided, as the demo prints it."""
    k = job.gate.knowledge
    adapter, parent = tiers(k.adapter), tiers(k.parent)
    return {
        "passed": job.gate.passed,
        "adapter": adapter,
        "parent": parent,
        "gains": gains(adapter, parent),
        "probes": {"M": k.m_probes, "P": k.p_probes, "C": k.c_probes, "R": k.r_probes},
        "m_lower_bound": round(k.m_lower_bound, 4),
        "p_lower_bound": round(k.p_lower_bound, 4),
        "forgetting_pct": round(job.gate.forgetting_pct, 3),
        "reasons": list(job.gate.reasons),
    }


def window_text(w: events_pb2.DriftWindow) -> str:
    mark = "drift" if w.drift else "steady"
    return f"window {w.index}: p={w.p_value:.3f} MMD²={w.mmd2:.4f} {mark}"


@dataclass
class Stages:
    """One progress line per stage: seconds since the demo began, the stage, what it found; the
    figures are kept for the final JSON line."""

    clock: Callable[[], float] = time.monotonic
    out: Callable[[str], None] = print
    done: list[dict[str, Any]] = field(default_factory=list)
    _began: float = -1.0
    _stage: str = ""
    _stage_began: float = 0.0

    def __post_init__(self) -> None:
        self._began = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self._began

    def begin(self, name: str) -> None:
        self._stage, self._stage_began = name, self.clock()

    def note(self, message: str) -> None:
        """A line inside a long stage (training progress), not a stage of its own."""
        self.out(f"[{self.elapsed():7.1f}s]   {self._stage}: {message}")

    def end(self, message: str, ok: bool = True, **figures: Any) -> dict[str, Any]:
        seconds = round(self.clock() - self._stage_began, 1)
        mark = "" if ok else " (FAILED)"
        self.out(f"[{self.elapsed():7.1f}s] {self._stage:<15} {message}{mark} ({seconds}s)")
        row = {"stage": self._stage, "seconds": seconds, "ok": ok, **figures}
        self.done.append(row)
        return row

    def seconds(self) -> dict[str, float]:
        return {row["stage"]: row["seconds"] for row in self.done}
