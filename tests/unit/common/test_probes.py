"""Knowledge probes: spans, distractors, determinism, tiers' raw material."""

from __future__ import annotations

import json

import pytest

from services.common.probes import (
    DISTRACTORS,
    Document,
    Probe,
    clause_rest,
    load_documents,
    number_spans,
    probe_document,
    probe_documents,
    pubmedqa_document,
    sentences,
    term_spans,
)

DOC = Document(
    id="d1",
    text=(
        "We enrolled 120 patients with chronic heart failure in the trial. "
        "Mortality was 12% in the treated group and 31% in the control group. "
        "The mean age of the cohort was 64.5 years, and 45% were women. "
        "Serum sodium fell by 3.2 mmol/l in 18% of patients given furosemide. "
        "Hospital stay was 6 days on average, against 9 days for 22% of controls."
    ),
    terms=("Heart Failure", "Furosemide", "Mortality"),
    restatements=("Furosemide lowered mortality to 12% in chronic heart failure.",),
)


def test_sentences_keep_decimals_together():
    parts = sentences(DOC.text)
    assert len(parts) == 5
    assert parts[2].startswith("The mean age") and "64.5 years" in parts[2]


def test_number_spans_carry_their_unit_and_format():
    spans = number_spans("Mortality was 12% against 31% and 64.5 years; 2.1 mmol/l.")
    assert [(s.text, s.key) for s in spans] == [
        ("12%", "%|0"),
        ("31%", "%|0"),
        ("64.5 years", "year|1"),
        ("2.1 mmol/l", "mmol/l|1"),
    ]


def test_term_spans_match_case_insensitively_longest_first():
    spans = term_spans("Chronic heart failure and heart rate", ["Heart Failure", "Heart"])
    assert [s.text for s in spans][:1] == ["heart failure"]


def test_clause_rest_stops_at_the_clause_end():
    assert clause_rest(" in the treated group, and more") == " in the treated group"
    assert clause_rest(" a b c d e f g h i j k") == " a b c d e f g h"


def test_probe_has_four_distractors_of_the_same_kind_and_the_answer_first():
    probes = probe_document(DOC, max_per_document=50)
    assert probes
    for p in probes:
        assert len(p.distractors) == DISTRACTORS
        assert p.answer not in p.distractors
        assert len(set(p.candidates)) == DISTRACTORS + 1
        assert p.candidates[0].strip().startswith(p.answer)
        if p.kind == "number" and p.key.startswith("%"):
            assert all(d.endswith("%") for d in p.distractors)
    # The prompt is a real sentence start: never empty (the engine refuses empty prompts).
    assert all(len(p.prefix.split()) >= 3 for p in probes)


def test_restatement_probes_ask_what_the_text_states():
    probes = probe_document(DOC, max_per_document=50)
    restated = [p for p in probes if p.origin == "restatement"]
    assert restated
    for p in restated:
        assert p.answer.lower() in DOC.text.lower()
        assert p.prefix in DOC.restatements[0]


def test_probes_are_deterministic_and_seeded():
    a = probe_document(DOC, seed=0, max_per_document=50)
    b = probe_document(DOC, seed=0, max_per_document=50)
    c = probe_document(DOC, seed=1, max_per_document=50)
    assert a == b
    assert [p.id for p in a] == [p.id for p in c]  # same spans
    assert [p.distractors for p in a] != [p.distractors for p in c]  # other draws


def test_distractors_come_from_the_nearest_documents_when_one_has_too_few():
    lone = Document("lone", "In this cohort the dose was 40 mg twice daily for all.")
    near = Document("near", "The dose was 10 mg, 20 mg, 80 mg or 160 mg once daily.")
    far = Document("far", "Birds migrate south in the autumn of 7 mg years.")
    probes = probe_documents([lone], [near, far])
    assert len(probes) == 1
    assert set(probes[0].distractors) == {"10 mg", "20 mg", "80 mg", "160 mg"}


def test_a_span_without_enough_distractors_is_no_probe():
    assert probe_document(Document("x", "The trial enrolled exactly 40 patients in total.")) == []


def test_probe_round_trips_through_json():
    p = probe_document(DOC)[0]
    assert Probe.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_pubmedqa_items_give_text_and_restatement_probes(pubmedqa):
    docs = [pubmedqa_document(k, v) for k, v in list(pubmedqa.items())[:30]]
    probes = probe_documents(docs)
    assert {p.origin for p in probes} == {"text", "restatement"}
    per_doc: dict[str, int] = {}
    for p in probes:
        if p.origin == "text":
            per_doc[p.doc_id] = per_doc.get(p.doc_id, 0) + 1
    assert max(per_doc.values()) <= 4
    assert len(per_doc) >= 25
    # The conclusion is never the text of the document (it is Tier-P material only).
    item = next(iter(pubmedqa.values()))
    assert item["LONG_ANSWER"] not in pubmedqa_document("x", item).text


def test_load_documents_reads_pubmedqa_and_jsonl(tmp_path, pubmedqa):
    key = next(iter(pubmedqa))
    raw = json.dumps({key: pubmedqa[key]}).encode()
    (doc,) = load_documents("f.json", raw)
    assert doc.id == key and doc.terms and doc.restatements
    lines = b'{"id": "a", "text": "Some text.", "metadata": {"tags": ["x"]}}\n{"text": "More."}\n'
    docs = load_documents("f.jsonl", lines)
    assert [d.id for d in docs] == ["a", "2"] and docs[0].terms == ("x",)
    with pytest.raises(ValueError, match="no text"):
        load_documents("bad.jsonl", b'{"id": "a"}\n')
