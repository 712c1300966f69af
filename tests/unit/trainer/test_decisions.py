"""The trainer's decisions without a network: the evaluation gate, the rollout policy, a job's
dataset from its sources, and which events it accepts."""

from __future__ import annotations

import asyncio
import json

import pytest

from knowstream.events.v1 import events_pb2
from services.common.kafka import BadEvent, new_header
from services.llm.prompts import Passage
from services.trainer import gate, rollout
from services.trainer.data import Dataset, Example, in_eval_split
from services.trainer.jobs import parse_retrain
from services.trainer.policy import parse_correction
from services.trainer.recent import RecentChunk
from services.trainer.sources import Recipe, Sources, build_dataset, read_labelled
from services.trainer.store import Correction, ShadowTally

THRESHOLDS = gate.Thresholds(min_gain=0.0, max_forgetting_pct=2.0, min_eval_items=4)


def metrics(**kw) -> gate.GateMetrics:
    m = gate.GateMetrics(
        eval_items=10,
        accuracy=0.7,
        live_accuracy=0.6,
        base_accuracy=0.55,
        base_perplexity=20.0,
        perplexity=20.2,
    )
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def test_gate_passes_an_adapter_better_than_live_that_kept_general_english():
    passed, reasons = gate.decide(metrics(), THRESHOLDS)
    assert passed
    assert len(reasons) == 2
    assert "gain +0.100 >= +0.000" in reasons[0]
    assert "+1.00% <= 2.00%" in reasons[1]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"accuracy": 0.58}, "gain -0.020 < +0.000"),
        ({"perplexity": 20.5}, "+2.50% > 2.00%"),
        ({"eval_items": 3}, "only 3 eval items"),
    ],
)
def test_gate_fails_with_the_reason(change, why):
    passed, reasons = gate.decide(metrics(**change), THRESHOLDS)
    assert not passed
    assert any(why in r for r in reasons), reasons


def test_gate_measures_candidate_base_and_live_on_the_same_qa_examples():
    examples = [Example(f"qa:{i}", "qa", "s", f"q{i}", label) for i, label in enumerate("yyny")]
    examples.append(Example("doc:1", "document", "", "", "text"))
    calls: list[str] = []

    async def score(example: Example, adapter: str) -> str:
        calls.append(adapter)
        return example.target if adapter == "cand" else "y"

    m = asyncio.run(gate.measure(examples, "cand", "base", score, 2, (10.0, 10.5)))
    assert (m.eval_items, m.accuracy, m.base_accuracy, m.live_accuracy) == (4, 1.0, 0.75, 0.75)
    assert m.forgetting_pct == pytest.approx(5.0)
    # The document is not asked; live is the base model, so it is asked once.
    assert sorted(set(calls)) == ["base", "cand"] and len(calls) == 8


ROLLOUT = rollout.RolloutThresholds(samples=10, min_agreement=0.3, max_error_share=0.1)


def test_rollout_waits_for_enough_shadow_pairs():
    assert rollout.decide(ShadowTally(9, 9.0, 0), ROLLOUT, "base", "base", 0.1) is None


def test_rollout_promotes_a_healthy_candidate_whose_gate_still_stands():
    action, reasons = rollout.decide(ShadowTally(10, 8.0, 0), ROLLOUT, "base", "base", 0.1)
    assert action == "promote"
    assert "agreement with live 0.80" in reasons[0]


@pytest.mark.parametrize(
    ("tally", "live_now", "why"),
    [
        (ShadowTally(10, 8.0, 2), "base", "2 shadow calls failed"),
        (ShadowTally(10, 2.0, 0), "base", "agreement 0.20 < floor 0.30"),
        (ShadowTally(10, 8.0, 0), "abc", "live changed since the gate"),
        (ShadowTally(10, 8.0, 0, 1, 2), "base", "1 for the candidate, 2 for live"),
    ],
)
def test_rollout_retires_with_the_reason(tally, live_now, why):
    action, reasons = rollout.decide(tally, ROLLOUT, "base", live_now, 0.1)
    assert action == "retire"
    assert any(why in r for r in reasons), reasons


def test_feedback_retires_only_with_enough_votes_and_is_a_reason_to_promote():
    few = rollout.decide(ShadowTally(10, 8.0, 0, 0, 2), ROLLOUT, "base", "base", 0.1)
    assert few is not None and few[0] == "promote"
    assert "0 for the candidate, 2 for live" in few[1][1]
    tied = rollout.decide(ShadowTally(10, 8.0, 0, 2, 2), ROLLOUT, "base", "base", 0.1)
    assert tied is not None and tied[0] == "promote"


@pytest.mark.parametrize(
    ("live", "shadow", "rating", "correction", "vote"),
    [
        ("yes", "no", 0, "no", "shadow"),
        ("yes", "no", -1, "yes", "live"),  # the correction outweighs the rating
        ("yes", "no", -1, "", "shadow"),
        ("yes", "no", 1, "", "live"),
        ("yes", "no", 0, "", None),
        ("yes", "yes", -1, "no", None),  # same answers: feedback cannot tell them apart
        ("yes", "no", 0, "maybe", None),
        (
            "Aspirin lowers the risk of a second infarction [1].",
            "Aspirin has no effect on infarction risk [2].",
            0,
            "It lowers the risk of a second infarction.",
            "live",
        ),
    ],
)
def test_feedback_on_a_live_answer_votes_for_the_answer_it_favours(
    live, shadow, rating, correction, vote
):
    assert rollout.judge_feedback(live, shadow, rating, correction) == vote


def test_shadow_agreement_leaves_failed_calls_out():
    assert ShadowTally(pairs=4, agreement_sum=3.0, errors=1).agreement == 1.0


RECIPE = Recipe(
    k=4,
    max_context_chars=4000,
    train_context_chars=300,
    with_reasons=True,
    domain_k=2,
    max_documents=3,
    max_recent_documents=2,
    replay_share=0.5,
    eval_share=0.3,
    seed=0,
    concurrency=4,
)


@pytest.fixture
def labelled(tmp_path, pubmedqa):
    path = tmp_path / "labelled.json"
    path.write_text(json.dumps({k: pubmedqa[k] for k in list(pubmedqa)[:20]}), encoding="utf-8")
    return path


def fake_search(unknown: str):
    async def search(question: str, k: int) -> list[Passage]:
        if question == unknown:
            return []
        return [
            Passage(f"d{n}", f"d{n}#{question[:8]}", "", f"passage {n} about {question} " * 20)
            for n in range(k)
        ]

    return search


def test_a_jobs_dataset_from_labelled_items_corrections_domain_text_and_replay(labelled, pubmedqa):
    items, _ = read_labelled(str(labelled))
    parent = Dataset([Example(f"qa:old{i}", "qa", "s", f"p{i}", "yes") for i in range(30)], [], "p")
    sources = Sources(
        labelled_path=str(labelled),
        questions=["first domain question", "second domain question"],
        corrections=[
            Correction("r1", "is it so?", "no, it is not", "ks.feedback:2:17"),
            Correction("r2", "is that so?", "yes", "ks.feedback:2:21"),
        ],
        parent_dataset=parent,
    )
    dataset = asyncio.run(build_dataset(sources, RECIPE, fake_search(items[0].question)))
    p = dataset.provenance
    # The first item's question retrieved nothing: it trains on its own abstract.
    assert p["context_fallback"] == 1
    assert p["corrections"]["offsets"] == {"ks.feedback:2": [17, 21]}
    # 20 labelled + 2 corrections + at most 3 passages of the domain questions, then
    # half as many (12 of 25) replayed examples of the parent's training data.
    assert p["counts"] == {"qa": 20 + 12, "correction": 2, "document": 3}
    assert p["replayed"] == 12 and len(p["replay_ids"]) == 12
    held = {e.id for e in dataset.eval}
    assert held == {f"qa:{i.id}" for i in items if in_eval_split(f"qa:{i.id}", 0.3, 0)}
    assert not any(e.id.startswith("qa:old") for e in dataset.eval)
    # Eval prompts are built as the infer service serves them; training prompts are shorter.
    longest_train = max(len(e.prompt) for e in dataset.train if e.kind == "qa")
    assert all(len(e.prompt) > longest_train for e in dataset.eval if e.id != f"qa:{items[0].id}")
    # Training targets carry the reasoning after the label; eval targets are the label alone.
    by_id = {i.id: i for i in items}
    for e in dataset.train:
        if e.kind == "qa" and not e.id.startswith("qa:old"):
            item = by_id[e.id[3:]]
            assert e.target == f"{item.label}. {item.long_answer}"
    assert all(e.target in ("yes", "no", "maybe") for e in dataset.eval)
    assert {e.question for e in dataset.train if e.kind == "correction"} == {
        "is it so?",
        "is that so?",
    }


def test_recently_ingested_documents_not_in_the_prompts_are_continued_pretraining_text(
    labelled,
):
    def chunk(doc: str, ts: int, offset: str) -> RecentChunk:
        return RecentChunk(f"{doc}#h#0", doc, "h", f"title {doc}", f"text of {doc}", ts, offset)

    recent = [
        chunk("d1", 300, "ks.chunks:0:1"),  # retrieved for a labelled question: in its prompt
        chunk("new-a", 100, "ks.chunks:1:5"),
        chunk("new-b", 200, "ks.chunks:1:9"),
        chunk("new-c", 150, "ks.chunks:0:3"),
    ]
    sources = Sources(labelled_path=str(labelled), recent=recent, recent_since_ms=50)
    dataset = asyncio.run(build_dataset(sources, RECIPE, fake_search("")))
    documents = {e.id: e.target for e in dataset.train if e.kind == "document"}
    # The newest two of those not in a prompt (RECIPE.max_recent_documents).
    assert documents == {
        "doc:new-b#h#0": "title new-b\ntext of new-b",
        "doc:new-c#h#0": "title new-c\ntext of new-c",
    }
    assert dataset.provenance["recent_documents"] == {
        "since_ms": 50,
        "read": 4,
        "in_prompts": 1,
        "used": 2,
        "offsets": {"ks.chunks:1": [9, 9], "ks.chunks:0": [3, 3]},
    }


def test_unreadable_labelled_data_is_refused_with_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.json"):
        read_labelled(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"1": {"QUESTION": "q", "final_decision": "perhaps"}}), encoding="utf-8"
    )
    with pytest.raises(ValueError, match="item 1: final_decision 'perhaps'"):
        read_labelled(str(bad))


def retrain(**kw) -> bytes:
    event = events_pb2.RetrainRequested(
        header=new_header("test"), idempotency_key="ref:retrain:4", example_questions=["q?"]
    )
    for k, v in kw.items():
        setattr(event, k, v)
    return event.SerializeToString()


def test_retrain_requests_are_validated():
    assert parse_retrain(retrain()).idempotency_key == "ref:retrain:4"
    with pytest.raises(BadEvent, match="not a RetrainRequested"):
        parse_retrain(b"\xff\x00 not protobuf")
    with pytest.raises(BadEvent, match="without an idempotency_key"):
        parse_retrain(retrain(idempotency_key=""))
    old = events_pb2.RetrainRequested(idempotency_key="k")
    old.header.schema_version = 99
    with pytest.raises(BadEvent, match="schema_version 99"):
        parse_retrain(old.SerializeToString())


def test_only_feedback_with_a_correction_and_its_question_is_training_data():
    def feedback(**kw) -> bytes:
        return events_pb2.FeedbackEvent(
            header=new_header("t"), request_id="r", **kw
        ).SerializeToString()

    c = parse_correction(feedback(correction=" no ", question="q?"), "t:0:5")
    assert c == Correction("r", "q?", "no", "t:0:5")
    assert parse_correction(feedback(rating=-1, question="q?"), "t:0:6") is None
    assert parse_correction(feedback(correction="no"), "t:0:7") is None
    with pytest.raises(BadEvent):
        parse_correction(b"junk", "t:0:8")


def test_gate_recalls_base_and_live_results_on_the_same_eval_set():
    examples = [Example(f"qa:{i}", "qa", "s", f"q{i}", label) for i, label in enumerate("yyny")]
    stored: dict[tuple[str, str], tuple] = {}
    calls: list[str] = []

    async def score(example: Example, adapter: str) -> str:
        calls.append(adapter)
        return "y"

    async def recall(key, adapter):
        return stored.get((key, adapter))

    async def remember(key, adapter, result):
        stored[(key, adapter)] = result

    for candidate in ("c1", "c2"):
        m = asyncio.run(
            gate.measure(examples, candidate, "live1", score, 2, (1.0, 1.0), recall, remember)
        )
        assert (m.base_accuracy, m.live_accuracy) == (0.75, 0.75)
    # Base and live asked once (4 questions each); each candidate always.
    assert calls.count("base") == 4 and calls.count("live1") == 4
    assert calls.count("c1") == 4 and calls.count("c2") == 4


def test_gate_overrides_are_range_checked_and_looser_ones_need_a_reason():
    from knowstream.trainer.v1 import trainer_pb2
    from services.trainer.jobs import check_gate_overrides
    from services.trainer.settings import TrainerSettings

    s = TrainerSettings()
    check_gate_overrides(trainer_pb2.GateOverrides(min_gain=0.05, min_retention=0.95), s)
    for bad in (
        trainer_pb2.GateOverrides(min_gain=-3),
        trainer_pb2.GateOverrides(max_forgetting_pct=1000),
        trainer_pb2.GateOverrides(min_lower_bound=-0.5),
    ):
        with pytest.raises(ValueError, match="must be in"):
            check_gate_overrides(bad, s)
    with pytest.raises(ValueError, match="force_reason"):
        check_gate_overrides(trainer_pb2.GateOverrides(min_gain=-1), s)
    check_gate_overrides(trainer_pb2.GateOverrides(min_gain=-1, force_reason="a drill"), s)
