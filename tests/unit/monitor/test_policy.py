"""The decision policy: K consecutive drifted windows, cooldown, gap vs shift, stable keys."""

from __future__ import annotations

import json

from services.monitor.policy import DriftPolicy, PolicyConfig, PolicyState, WindowResult


def w(i: int, drift: bool, score: float = 0.8) -> WindowResult:
    return WindowResult(i, drift, [f"q{i}"], [score], {"p_value": 0.0 if drift else 0.5})


def run(policy: DriftPolicy, flags: list[bool], score: float = 0.8):
    return [d for i, f in enumerate(flags) if (d := policy.observe(w(i, f, score))) is not None]


def test_k_consecutive_windows_then_cooldown():
    policy = DriftPolicy(PolicyConfig(consecutive=2, cooldown_windows=3), "ref1")
    decisions = run(policy, [True, False, True, True, True, True, True, True, True])
    # 0 alone is not enough; 2-3 trigger; windows 4..6 fall in the cooldown; 7-8 trigger.
    assert [d.windows for d in decisions] == [[2, 3], [7, 8]]
    assert all(d.kind == "retrain" for d in decisions)
    assert decisions[0].idempotency_key == "ref1:retrain:2"


def test_low_retrieval_scores_make_a_knowledge_gap():
    policy = DriftPolicy(PolicyConfig(consecutive=2), "ref1")
    (decision,) = run(policy, [True, True], score=0.2)
    assert decision.kind == "knowledge_gap" and decision.poorly_retrieved_share == 1.0
    assert decision.examples == ["q0", "q1"]


def test_replay_gives_the_same_keys_and_state_survives_a_restart():
    flags = [False, True, True, False, True, True, True]
    first = DriftPolicy(PolicyConfig(consecutive=2, cooldown_windows=1), "r")
    keys = [d.idempotency_key for d in run(first, flags)]
    again = DriftPolicy(PolicyConfig(consecutive=2, cooldown_windows=1), "r")
    assert [d.idempotency_key for d in run(again, flags)] == keys == ["r:retrain:1", "r:retrain:4"]

    # Stopped after window 4 (one drifted window into a streak), restored from its state: the
    # same event, with window 4 still part of its evidence, and nothing else.
    half = DriftPolicy(PolicyConfig(consecutive=2, cooldown_windows=1), "r")
    for i, f in enumerate(flags[:5]):
        half.observe(w(i, f))
    restored = DriftPolicy(
        PolicyConfig(consecutive=2, cooldown_windows=1),
        "r",
        PolicyState.from_dict(json.loads(json.dumps(half.state.to_dict()))),  # as in Redis
    )
    later = [d for i, f in enumerate(flags) if i >= 5 and (d := restored.observe(w(i, f)))]
    assert [d.idempotency_key for d in later] == ["r:retrain:4"]
    assert later[0].windows == [4, 5] and later[0].examples == ["q4", "q5"]
