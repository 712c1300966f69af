"""The rollout policy's decision for an adapter in shadow, once it has seen enough pairs.

Promotion needs all of: enough shadow pairs; few failed shadow calls (a broken adapter or one
Triton cannot load); agreement with live above a floor (an adapter that disagrees with nearly
every live answer is more likely broken than better: the gate measured it on a few hundred
items, shadow sees real traffic); and the gate's verdict still standing, i.e. the live adapter
it beat is still the live one. Otherwise the candidate is retired.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.trainer.store import ShadowTally


@dataclass(frozen=True)
class RolloutThresholds:
    samples: int
    min_agreement: float
    max_error_share: float


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
    if live_now != gate_live:
        reasons.append(f"live changed since the gate ({gate_live} then, {live_now} now)")
        return "retire", reasons
    reasons.append(f"gate: accuracy {gate_gain:+.3f} vs live {gate_live}")
    return "promote", reasons
