"""When drifted windows become an event, and which one.

K consecutive drifted windows raise an event, then a cooldown (in windows) holds further ones.
The event is a **knowledge gap** when most questions of the triggering windows retrieved
poorly (their best dense score is below ``gap_score``: the documents are missing, retraining
would not help), else a **behaviour shift** (retrain). Every event has an idempotency key
derived from the reference and the first triggering window, so replaying the same stream
yields the same keys and consumers can drop duplicates. The state is a plain dict, so the
service can keep it in Redis and resume after a restart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class PolicyConfig:
    consecutive: int = 2
    cooldown_windows: int = 8
    # A question "retrieved poorly" when its best dense (cosine) score is below this.
    gap_score: float = 0.45
    # Share of poorly retrieved questions in the triggering windows that makes it a gap.
    gap_share: float = 0.5


@dataclass
class WindowResult:
    index: int
    drift: bool
    questions: list[str]
    # Best dense retrieval score of each question (None when unknown).
    top_scores: list[float | None]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decision:
    kind: Literal["retrain", "knowledge_gap"]
    idempotency_key: str
    windows: list[int]
    poorly_retrieved_share: float
    examples: list[str]
    stats: list[dict[str, Any]]


@dataclass
class PolicyState:
    # The current run of consecutive drifted windows (the evidence of the next event).
    streak: list[WindowResult] = field(default_factory=list)
    cooldown_until: int = -1  # windows with a lower index neither count nor trigger
    events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyState:
        return cls(
            streak=[WindowResult(**w) for w in data.get("streak", [])],
            cooldown_until=int(data.get("cooldown_until", -1)),
            events=int(data.get("events", 0)),
        )


class DriftPolicy:
    def __init__(self, config: PolicyConfig, reference_id: str, state: PolicyState | None = None):
        self.config = config
        self.reference_id = reference_id
        self.state = state or PolicyState()

    def observe(self, window: WindowResult) -> Decision | None:
        s = self.state
        if not window.drift or window.index < s.cooldown_until:
            s.streak = []
            return None
        s.streak.append(window)
        if len(s.streak) < self.config.consecutive:
            return None
        triggering = s.streak
        scores = [x for w in triggering for x in w.top_scores if x is not None]
        poor = sum(x < self.config.gap_score for x in scores) / len(scores) if scores else 0.0
        kind: Literal["retrain", "knowledge_gap"] = (
            "knowledge_gap" if scores and poor >= self.config.gap_share else "retrain"
        )
        pairs = [(q, x) for w in triggering for q, x in zip(w.questions, w.top_scores, strict=True)]
        if kind == "knowledge_gap":
            # The questions the knowledge base could not answer are the useful examples.
            pairs = [(q, x) for q, x in pairs if x is not None and x < self.config.gap_score]
        examples = list(dict.fromkeys(q for q, _ in pairs))[:10]
        decision = Decision(
            kind=kind,
            idempotency_key=f"{self.reference_id}:{kind}:{triggering[0].index}",
            windows=[w.index for w in triggering],
            poorly_retrieved_share=round(poor, 4),
            examples=examples,
            stats=[w.stats for w in triggering],
        )
        s.cooldown_until = window.index + 1 + self.config.cooldown_windows
        s.streak = []
        s.events += 1
        return decision
