"""The rollout policy's decision for an adapter in shadow, once it has seen enough pairs.

Promotion needs all of: enough shadow pairs; few failed shadow calls (a broken adapter or one
Triton cannot load); agreement with live above a floor (an adapter that disagrees with nearly
every live answer is more likely broken than better: the gate measured it on a few hundred
items, shadow sees real traffic); and the gate's verdict still standing, i.e. the live adapter
it beat is still the live one; and users' feedback, where it can tell the two apart, not
favouring live. Otherwise the candidate is retired.

Feedback is given on live answers (users never see shadow ones), so it says something about the
candidate only where the two answered differently: a correction that matches one answer and not
the other is a vote for that one; a bad rating of the live answer is a vote for the shadow's
different answer, a good rating one for live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.llm.agreement import agreement
from services.trainer.store import ShadowTally

Vote = Literal["shadow", "live"]
# How much closer a correction must be to one answer than to the other to count as a vote.
CORRECTION_MARGIN = 0.2


@dataclass(frozen=True)
class RolloutThresholds:
    samples: int
    min_agreement: float
    max_error_share: float
    # Feedback votes needed before feedback can retire a candidate.
    min_feedback_votes: int = 3


def judge_feedback(
    live_answer: str, shadow_answer: str, rating: int, correction: str
) -> Vote | None:
    """Which answer a user's feedback on the live answer favours, or None when it cannot tell
    (same answers, neutral feedback, a correction as close to both)."""
    if agreement(live_answer, shadow_answer) >= 1.0:
        return None
    if correction.strip():
        to_live = agreement(correction, live_answer)
        to_shadow = agreement(correction, shadow_answer)
        if abs(to_shadow - to_live) < CORRECTION_MARGIN:
            return None
        return "shadow" if to_shadow > to_live else "live"
    if rating < 0:
        return "shadow"
    if rating > 0:
        return "live"
    return None


def decide(
    tally: ShadowTally,
    t: RolloutThresholds,
    gate_live: str,
    live_now: str,
    gate_gain: float,
) -> tuple[str, list[str]] | None:
    """("promote" | "retire", reasons), or None while fewer than ``samples`` pairs are in."""
    if tally.pairs < t.samples:
        return None
    reasons = [f"{tally.pairs} shadow pairs, agreement with live {tally.agreement:.2f}"]
    error_share = tally.errors / tally.pairs
    if error_share > t.max_error_share:
        reasons.append(
            f"{tally.errors} shadow calls failed ({error_share:.0%} > {t.max_error_share:.0%})"
        )
        return "retire", reasons
    if tally.agreement < t.min_agreement:
        reasons.append(f"agreement {tally.agreement:.2f} < floor {t.min_agreement:.2f}")
        return "retire", reasons
    votes = tally.feedback_shadow + tally.feedback_live
    feedback = (
        f"feedback on differing answers: {tally.feedback_shadow} for the candidate, "
        f"{tally.feedback_live} for live"
    )
    if votes >= t.min_feedback_votes and tally.feedback_live > tally.feedback_shadow:
        reasons.append(feedback)
        return "retire", reasons
    if votes:
        reasons.append(feedback)
    if live_now != gate_live:
        reasons.append(f"live changed since the gate ({gate_live} then, {live_now} now)")
        return "retire", reasons
    reasons.append(f"gate: accuracy {gate_gain:+.3f} vs live {gate_live}")
    return "promote", reasons
