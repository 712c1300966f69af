"""The demo's pure parts (services/cli/demo_plan.py): the corpus split by MeSH terms, the
traffic plan, the shadow traffic, the gains and the stage bookkeeping. The demo itself runs
against the stack (`make demo`), like the benchmarks, not in the test suite."""

from __future__ import annotations

import json

import pytest

from knowstream.events.v1 import events_pb2
from knowstream.trainer.v1 import trainer_pb2
from services.cli.demo_plan import (
    CARDIOLOGY,
    ONCOLOGY,
    Stages,
    gains,
    gate_figures,
    make_plan,
    shadow_questions,
    topic_ids,
    window_text,
)
from services.common.settings import REPO_ROOT

LABELLED = REPO_ROOT.parent / "shared/data/pubmedqa/labeled.json"


def item(*meshes: str) -> dict[str, object]:
    return {"QUESTION": f"q {meshes}", "CONTEXTS": ["text"], "MESHES": list(meshes)}


def fake_data(oncology: int, cardiology: int) -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = {}
    for i in range(max(oncology, cardiology)):
        if i < oncology:
            data[f"o{i}"] = item("Humans", "Breast Neoplasms")
        if i < cardiology:
            data[f"c{i}"] = item("Myocardial Infarction", "Aged")
    data["both"] = item("Heart Neoplasms")
    data["neither"] = item("Humans", "Pregnancy")
    return data


def test_topic_ids_keep_file_order_and_leave_out_items_of_both_topics():
    data = fake_data(3, 2)
    assert topic_ids(data, ONCOLOGY, CARDIOLOGY) == ["o0", "o1", "o2"]
    assert topic_ids(data, CARDIOLOGY, ONCOLOGY) == ["c0", "c1"]


def test_plan_splits_reference_steady_window_and_shifted_windows():
    plan = make_plan(fake_data(10, 8), window=3, consecutive=2, reference=4)
    assert plan.corpus == [f"o{i}" for i in range(10)]
    assert plan.reference == ["o0", "o1", "o2", "o3"]
    assert plan.steady == ["o4", "o5", "o6"]
    # The shifted questions' abstracts are the missing documents ingested after the gap.
    assert plan.shifted == plan.missing == [f"c{i}" for i in range(6)]
    assert not set(plan.missing) & set(plan.corpus)


def test_plan_refuses_a_file_too_small_for_the_windows():
    with pytest.raises(ValueError, match="oncology"):
        make_plan(fake_data(5, 8), window=3, consecutive=2, reference=4)
    with pytest.raises(ValueError, match="cardiology"):
        make_plan(fake_data(10, 5), window=3, consecutive=2, reference=4)


@pytest.mark.skipif(not LABELLED.is_file(), reason="the labelled PubMedQA file is not here")
def test_plan_on_the_labelled_file_is_deterministic_and_disjoint():
    data = json.loads(LABELLED.read_text(encoding="utf-8"))
    plan = make_plan(data, window=10, consecutive=2, reference=40)
    assert plan == make_plan(data, window=10, consecutive=2, reference=40)
    assert (len(plan.corpus), len(plan.reference), len(plan.steady)) == (92, 40, 10)
    assert len(plan.missing) == 20
    assert not set(plan.missing) & set(plan.corpus)


def test_shadow_traffic_alternates_the_topics_and_cycles():
    plan = make_plan(fake_data(10, 8), window=2, consecutive=2, reference=4)
    assert shadow_questions(plan, 6) == ["o4", "c0", "o5", "c1", "o4", "c0"]


def test_gains_are_over_the_parent():
    adapter = {"M": 0.5, "P": 0.6, "C": 0.2, "R": 0.95}
    parent = {"M": 0.0, "P": 0.0, "C": 0.0, "R": 1.0}
    assert gains(adapter, parent) == {"M": 0.5, "P": 0.6, "C": 0.2, "R": -0.05}


def test_gate_figures_carry_tiers_bounds_and_reasons():
    job = trainer_pb2.Job(
        gate=trainer_pb2.GateResult(
            passed=False,
            reasons=["tier M 0.300 vs control 0.250: no significant gain"],
            forgetting_pct=0.5,
            knowledge=trainer_pb2.KnowledgeGateResult(
                adapter=trainer_pb2.TierAccuracy(m=0.3, p=0.25, c=0.25, r=1.0),
                parent=trainer_pb2.TierAccuracy(r=1.0),
                m_probes=20,
                c_probes=8,
                m_lower_bound=-0.2,
            ),
        )
    )
    figures = gate_figures(job)
    assert figures["passed"] is False
    assert figures["gains"] == {"M": 0.3, "P": 0.25, "C": 0.25, "R": 0.0}
    assert figures["probes"] == {"M": 20, "P": 0, "C": 8, "R": 0}
    assert figures["m_lower_bound"] == -0.2
    assert figures["reasons"] == list(job.gate.reasons)


def test_window_text_names_the_statistics():
    w = events_pb2.DriftWindow(index=3, p_value=0.0, mmd2=0.0912, drift=True)
    assert window_text(w) == "window 3: p=0.000 MMD²=0.0912 drift"


def test_stages_print_one_line_each_with_elapsed_and_own_seconds():
    now = [100.0]
    lines: list[str] = []
    stages = Stages(clock=lambda: now[0], out=lines.append)
    stages.begin("ingest")
    now[0] += 2.5
    stages.note("halfway")
    now[0] += 2.5
    row = stages.end("92 abstracts", documents=92)
    stages.begin("train")
    now[0] += 10
    stages.end("rejected", ok=False)
    assert row == {"stage": "ingest", "seconds": 5.0, "ok": True, "documents": 92}
    assert lines[0] == "[    2.5s]   ingest: halfway"
    assert lines[1].startswith("[    5.0s] ingest ") and lines[1].endswith("92 abstracts (5.0s)")
    assert lines[2].endswith("rejected (FAILED) (10.0s)")
    assert stages.seconds() == {"ingest": 5.0, "train": 10.0}
    assert stages.elapsed() == 15.0
