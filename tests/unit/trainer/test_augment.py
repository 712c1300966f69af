"""Knowledge augmentation: each fact in several forms, its key spans kept verbatim with their
clause, nothing of the held-out restatements, bounded length, deterministic for a seed."""

from __future__ import annotations

import math
import time

import pytest

from services.common.probes import (
    Document,
    document_terms,
    number_spans,
    pubmedqa_document,
    sentences,
    term_spans,
)
from services.trainer.augment import (
    BUDGET_SLACK,
    QA_BUDGET,
    RESTATEMENT_BUDGET,
    Augmentation,
    Form,
    _clauses,
    _reordered,
    augment,
)

SYNTHETIC = Document(
    id="syn",
    text=(
        "Although the cohort was small and followed for a short time, 45% of patients responded "
        "to metformin therapy within the first three months. "
        "The trial enrolled 66 patients at four university hospitals between 2008 and 2010. "
        "Mean systolic pressure fell by 12.5 mm Hg after treatment in the intervention arm. "
        "Adverse events were rare."
    ),
    terms=("Metformin", "Hypertension"),
    restatements=("Metformin therapy QZXW improves glycaemic control in 45% of patients.",),
)


@pytest.fixture(scope="module")
def docs(pubmedqa) -> list[Document]:
    return [pubmedqa_document(k, v) for k, v in list(pubmedqa.items())[:200]]


def kinds(forms: list[Form], kind: str) -> list[str]:
    return [f.text for f in forms if f.kind == kind]


def keyed(doc: Document) -> list[tuple[str, list]]:
    terms = document_terms(doc)
    return [(s, sp) for s in sentences(doc.text) if (sp := number_spans(s) + term_spans(s, terms))]


def test_the_same_document_and_settings_give_the_same_forms_and_seeds_vary_shuffles(docs):
    doc = docs[0]
    assert augment(doc, Augmentation()) == augment(doc, Augmentation())
    shuffles = {tuple(kinds(augment(doc, Augmentation(seed=s)), "shuffle")) for s in range(5)}
    assert len(shuffles) > 1


def test_raw_comes_first_then_shuffles_that_keep_every_sentence_in_a_new_order(docs):
    for doc in docs:
        forms = augment(doc, Augmentation(shuffles=3))
        assert forms[0] == Form("raw", doc.text)
        parts = sentences(doc.text)
        copies = kinds(forms, "shuffle")
        others = math.factorial(min(len(parts), 5)) - 1 if parts else 0
        assert len(copies) == min(3, others) and len(set(copies)) == len(copies)
        for copy in copies:
            assert copy != " ".join(parts)
            assert len(copy) == len(" ".join(parts))
            assert all(p in copy for p in parts)


def test_a_two_sentence_document_has_its_one_other_order_and_one_sentence_none():
    two = Document("two", "The dose was 5 mg. The trial lasted 12 weeks.")
    assert kinds(augment(two, Augmentation(shuffles=3)), "shuffle") == [
        "The trial lasted 12 weeks. The dose was 5 mg."
    ]
    one = Document("one", "The dose was 5 mg in all 40 patients of the two treatment arms.")
    assert [f.kind for f in augment(one, Augmentation())] == ["raw", "restatement", "qa"]
    short = augment(Document("short", "The dose was 5 mg."), Augmentation())
    assert [f.kind for f in short] == ["raw", "restatement", "qa"]


def test_a_document_without_key_spans_has_only_raw_and_shuffles():
    doc = Document("plain", "Nothing was measured here. Nobody was counted either. It rained.")
    assert document_terms(doc) == []
    assert {f.kind for f in augment(doc, Augmentation())} == {"raw", "shuffle"}
    assert augment(Document("empty", ""), Augmentation()) == [Form("raw", "")]


def test_every_key_span_stays_in_its_clause_and_qa_answers_are_the_full_sentences(docs):
    total = answered = restated_clauses = clauses = 0
    for doc in [SYNTHETIC, *docs[:50]]:
        forms = augment(doc, Augmentation())
        restated, qa = "".join(kinds(forms, "restatement")), "".join(kinds(forms, "qa"))
        for sentence, spans in keyed(doc):
            total += 1
            if f"Answer: {sentence}" in qa:
                answered += 1
                assert all(span.text in qa for span in spans)
            for span in spans:
                a, b = next(c for c in _clauses(sentence, spans) if span.start < c[1] + 2)
                # Only a clause's first letter may change case, and never inside a span.
                clauses += 1
                clause = sentence[a:b].rstrip(".!?")[1:]
                restated_clauses += clause in restated and span.text in restated
    # The budgets may leave a sentence out, but seldom.
    assert answered >= 0.95 * total
    assert restated_clauses >= 0.95 * clauses


def test_restatements_cover_the_key_sentences_of_a_real_document(docs):
    doc = docs[1]
    restated = kinds(augment(doc, Augmentation()), "restatement")[0]
    for sentence, spans in keyed(doc):
        for span in spans:
            a, b = next(c for c in _clauses(sentence, spans) if span.start < c[1] + 2)
            assert sentence[a:b].rstrip(".!?")[1:] in restated
            assert span.text in restated


def test_questions_ask_for_the_span_by_its_kind():
    asked = set()
    for seed in range(10):
        qa = kinds(augment(SYNTHETIC, Augmentation(seed=seed)), "qa")[0]
        questions = [line for line in qa.splitlines() if line.startswith("Question:")]
        assert len(questions) == 3 and qa.count("\nAnswer: ") == 3
        assert all(q.startswith("Question: In this study, ") and q.endswith("?") for q in questions)
        asked |= set(questions)
    text = " ".join(asked)
    assert "what percentage of patients responded" in text  # 45%
    assert "enrolled how many patients at four" in text  # 66 patients
    assert "between what year and 2010" in text or "2008 and what year?" in text
    assert "fell by what value after treatment" in text  # 12.5 mm Hg
    assert "responded to what therapy" in text  # the term metformin


def test_an_introductory_clause_moves_behind_and_a_list_comma_does_not():
    def reordered(s: str) -> str | None:
        spans = number_spans(s) + term_spans(s, ["metformin", "LCAT"])
        return _reordered(s, spans, _clauses(s, spans))

    assert reordered("Although the cohort was small, 45% of patients responded to metformin.") == (
        "45% of patients responded to metformin, although the cohort was small."
    )
    assert reordered("Although the cohort was rather small, the response was 45% overall.") == (
        "The response was 45% overall, although the cohort was rather small."
    )
    # Capitalising a span would change it; a list comma is no clause boundary to turn around.
    assert (
        reordered("Although the cohort was rather small, metformin lowered HbA1c in 45%.") is None
    )
    assert reordered("Mutations in LCAT, ABCA1 and APOA1 were found in 10 of the probands.") is None
    assert reordered("Although the cohort was small, 45% of patients responded?") is None


def test_nothing_of_the_held_out_restatements_is_trained_on(docs):
    marker = augment(SYNTHETIC, Augmentation())
    assert all("QZXW" not in f.text and "glycaemic" not in f.text for f in marker)
    for doc in docs[:50]:
        held_out = [s for r in doc.restatements for s in sentences(r) if s not in doc.text]
        for form in augment(doc, Augmentation()):
            assert not any(s in form.text for s in held_out)
    # The restatements do not even steer the random choices.
    other = Document(SYNTHETIC.id, SYNTHETIC.text, SYNTHETIC.terms, ("Something else.",))
    assert augment(other, Augmentation()) == marker


def test_lengths_stay_within_their_budgets(docs):
    for doc in docs:
        forms = augment(doc, Augmentation())
        raw = len(doc.text)
        assert len("".join(kinds(forms, "restatement"))) <= RESTATEMENT_BUDGET * raw + BUDGET_SLACK
        assert len("".join(kinds(forms, "qa"))) <= QA_BUDGET * raw + BUDGET_SLACK


def test_options_off_leave_their_forms_out_and_the_others_unchanged(docs):
    doc = docs[0]
    full = augment(doc, Augmentation())
    assert augment(doc, Augmentation(shuffles=0, restatements=False, qa_pairs=False)) == [
        Form("raw", doc.text)
    ]
    assert augment(doc, Augmentation(shuffles=0)) == [f for f in full if f.kind != "shuffle"]
    no_restatement = augment(doc, Augmentation(restatements=False))
    assert no_restatement == [f for f in full if f.kind != "restatement"]
    assert augment(doc, Augmentation(qa_pairs=False)) == [f for f in full if f.kind != "qa"]
    with pytest.raises(ValueError, match="shuffles"):
        Augmentation(shuffles=-1)


def test_a_long_document_is_augmented_in_linear_time():
    sentence = "In group {i}, the mean dose was {i} mg in {j} patients, with 5% adverse events."
    text = " ".join(sentence.format(i=i, j=i + 7) for i in range(4000))
    doc = Document("long", text, terms=("adverse events",))
    started = time.perf_counter()
    forms = augment(doc, Augmentation())
    assert time.perf_counter() - started < 20
    assert len(kinds(forms, "shuffle")) == 2
    assert (
        sum(map(len, kinds(forms, "restatement"))) <= RESTATEMENT_BUDGET * len(text) + BUDGET_SLACK
    )
    assert sum(map(len, kinds(forms, "qa"))) <= QA_BUDGET * len(text) + BUDGET_SLACK
