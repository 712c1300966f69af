"""Knowledge tiers: to-learn and retention filtering, the bootstrap bound and the gate."""

from __future__ import annotations

import asyncio

from services.common.knowledge import (
    KnowledgeThresholds,
    Limits,
    TierScores,
    bootstrap_lower_bound,
    build_probe_set,
    decide_knowledge,
    knowledge_metrics,
    score_tiers,
)
from services.common.probes import Probe


def probe(i: int, tier: str = "M") -> Probe:
    return Probe(
        id=f"{tier}{i}",
        doc_id=f"d{i}",
        kind="number",
        origin="text",
        prefix=f"{tier} probe number {i} was",
        answer=f"{i}%",
        distractors=tuple(f"{i + k}%" for k in range(1, 5)),
        suffix=" of all",
    )


def fake_score(right: set[str]):
    """A model that ranks the true candidate first exactly on the probes whose prompt is in
    ``right`` (by adapter: {adapter: prompts})."""

    async def score(prompt: str, candidates: list[str], adapter: str) -> list[float]:
        good = prompt in right.get(adapter, set())  # type: ignore[attr-defined]
        return [0.0, -1.0, -2.0, -3.0, -4.0] if good else [-5.0, 0.0, -1.0, -2.0, -3.0]

    return score


def test_bootstrap_bound_separates_a_real_gain_from_none():
    assert bootstrap_lower_bound([1] * 40 + [0] * 10, [0] * 40 + [1] * 10) > 0.4
    assert bootstrap_lower_bound([1, 0] * 20, [1, 0] * 20) < 0
    assert bootstrap_lower_bound([], [1]) == -1.0
    # Deterministic for a seed.
    a, b = [1, 0, 1, 1, 0] * 8, [0, 0, 1, 0, 0] * 8
    assert bootstrap_lower_bound(a, b, seed=3) == bootstrap_lower_bound(a, b, seed=3)


def test_probe_set_keeps_what_the_parent_gets_wrong_and_what_base_knows():
    learn = {t: [probe(i, t) for i in range(20)] for t in ("M", "P", "C")}
    retention = [probe(i, "R") for i in range(20)]
    right = {
        "parent": {p.prefix for t in learn for p in learn[t][:5]},
        "base": {p.prefix for p in retention[:12]},
    }
    ps = asyncio.run(
        build_probe_set(learn, retention, "parent", fake_score(right), Limits(dev_share=0.25))
    )
    for tier in ("P", "C"):
        assert {p.id for p in ps.tiers[tier]} == {f"{tier}{i}" for i in range(5, 20)}
    assert {p.id for p in ps.tiers["M"]} | {p.id for p in ps.dev} == {f"M{i}" for i in range(5, 20)}
    assert not {p.id for p in ps.tiers["M"]} & {p.id for p in ps.dev}
    assert {p.id for p in ps.tiers["R"]} == {f"R{i}" for i in range(12)}
    assert ps.candidates == {"M": 20, "P": 20, "C": 20, "R": 20}


def gate_for(adapter_right: dict[str, int], sizes: dict[str, int], ppl=(10.0, 10.1)):
    correct = {t: [1] * adapter_right[t] + [0] * (sizes[t] - adapter_right[t]) for t in sizes}
    m = knowledge_metrics(TierScores(correct), ppl)
    return decide_knowledge(m, KnowledgeThresholds())


def test_gate_passes_a_learned_adapter_and_names_each_figure():
    sizes = {"M": 60, "P": 30, "C": 40, "R": 50}
    passed, reasons = gate_for({"M": 50, "P": 12, "C": 6, "R": 48}, sizes)
    assert passed, reasons
    assert any("tier M 0.833 vs control 0.150" in r for r in reasons)
    assert any("tier R (retention, n=50) 0.960" in r for r in reasons)
    assert any("perplexity" in r for r in reasons)


def test_gate_refuses_an_adapter_without_gain():
    sizes = {"M": 60, "P": 30, "C": 40, "R": 50}
    passed, reasons = gate_for({"M": 9, "P": 4, "C": 6, "R": 50}, sizes)
    assert not passed
    assert any("tier M" in r and "<=" in r for r in reasons)


def test_gate_refuses_forgetting_and_lost_retention():
    sizes = {"M": 60, "P": 30, "C": 40, "R": 50}
    passed, reasons = gate_for({"M": 55, "P": 20, "C": 2, "R": 40}, sizes)
    assert not passed and any("tier R" in r and "<" in r for r in reasons)
    passed, reasons = gate_for({"M": 55, "P": 20, "C": 2, "R": 50}, sizes, ppl=(10.0, 10.5))
    assert not passed and any("+5.00% >" in r for r in reasons)


def test_gate_refuses_too_few_probes():
    passed, reasons = gate_for({"M": 3, "P": 1, "C": 0, "R": 5}, {"M": 3, "P": 1, "C": 2, "R": 5})
    assert not passed and any("only 3 to-learn probes in tier M" in r for r in reasons)


def test_score_tiers_counts_per_tier():
    ps = asyncio.run(
        build_probe_set(
            {"M": [probe(i) for i in range(10)], "C": [probe(i, "C") for i in range(10)]},
            [],
            "parent",
            fake_score({}),
            Limits(dev_share=0.0),
        )
    )
    right = {"cand": {p.prefix for p in ps.tiers["M"][:7]}}
    scores = asyncio.run(score_tiers(ps, "cand", fake_score(right)))
    assert scores.accuracy("M") == 0.7 and scores.accuracy("C") == 0.0
