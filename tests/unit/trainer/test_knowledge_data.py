"""A knowledge job's data: documents rebuilt from chunks, the control split, augmented training
text with replay, probes by tier (with a fake scorer)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.knowledge import split_control
from services.common.probes import pubmedqa_document
from services.trainer.augment import Augmentation
from services.trainer.knowledge_data import (
    KnowledgeRecipe,
    build_knowledge_data,
    documents_from_chunks,
    training_examples,
)
from services.trainer.recent import RecentChunk


def chunk(doc: str, index: int, text: str, ts: int = 0, tags: tuple[str, ...] = ()) -> RecentChunk:
    return RecentChunk(
        f"{doc}#v#{index}", doc, "v", "", text, ts, f"ks.chunks:0:{index}", index, tags
    )


def test_documents_from_chunks_drop_the_overlap_and_keep_tags():
    chunks = [
        chunk("b", 1, "Second sentence here. Third one follows.", 5),
        chunk("b", 0, "First sentence is this. Second sentence here.", 5, ("Term",)),
        chunk("a", 0, "Only one chunk.", 9),
    ]
    docs = documents_from_chunks(chunks)
    assert [d.id for d in docs] == ["a", "b"]  # newest first
    b = docs[1]
    assert b.text == "First sentence is this. Second sentence here. Third one follows."
    assert b.terms == ("Term",) or b.terms == ()


def test_known_documents_lend_their_restatements(pubmedqa):
    key, item = next(iter(pubmedqa.items()))
    known = {key: pubmedqa_document(key, item)}
    (doc,) = documents_from_chunks([chunk(key, 0, " ".join(item["CONTEXTS"]))], known)
    assert doc.restatements == known[key].restatements and doc.terms == known[key].terms


def test_control_split_is_by_id_and_stable(pubmedqa):
    docs = [pubmedqa_document(k, v) for k, v in pubmedqa.items()]
    train, control = split_control(docs, 0.2)
    assert 0.12 < len(control) / len(docs) < 0.28
    again, _ = split_control(list(reversed(docs)), 0.2)
    assert {d.id for d in again} == {d.id for d in train}


def test_training_text_has_every_form_and_replays_older_documents(pubmedqa):
    docs = [pubmedqa_document(k, v) for k, v in list(pubmedqa.items())[:6]]
    recipe = KnowledgeRecipe(augmentation=Augmentation(shuffles=1), replay_share=0.5)
    new, replay = training_examples(docs[:4], docs[4:], recipe)
    kinds = {e.id.rsplit(":", 2)[-2] for e in new}
    assert kinds == {"raw", "shuffle", "restatement", "qa"}
    assert len(replay) == 2 and all(e.id.endswith(":replay") for e in replay)
    # Training never sees a document's conclusion (tier-P text).
    for doc in docs[:4]:
        for e in new:
            assert doc.restatements[0] not in e.target


def test_build_knowledge_data_needs_new_documents():
    async def score(prompt, candidates, adapter):
        return [0.0] * len(candidates)

    with pytest.raises(ValueError, match="no new documents"):
        asyncio.run(build_knowledge_data([], [], "base", score, KnowledgeRecipe()))


def test_build_knowledge_data_tiers_and_provenance(pubmedqa):
    docs = [pubmedqa_document(k, v) for k, v in list(pubmedqa.items())[:15]]
    seen = []

    async def score(prompt, candidates, adapter):
        seen.append(adapter)
        # The parent (base) gets every probe wrong; the true candidate leads by 2 nats for R.
        return [-1.0, 0.0, -3, -3, -3] if adapter == "parent" else [0.0, -2, -3, -3, -3]

    data = asyncio.run(build_knowledge_data(docs, [], "parent", score, KnowledgeRecipe()))
    k = data.dataset.provenance["knowledge"]
    assert set(k["trained_documents"]) | set(k["control_documents"]) == {d.id for d in docs}
    assert data.probes.tiers["M"] and data.probes.tiers["C"] and data.probes.tiers["R"]
    assert {p.doc_id for p in data.probes.tiers["C"]} <= set(k["control_documents"])
    assert set(seen) == {"parent", "base"}  # to-learn against the parent, R against base
    assert k["probe_set"] == data.probes.digest
    assert not data.dataset.eval and data.dataset.train


def test_span_loss_trains_on_key_spans_and_their_clause_only(tiny_model):
    from transformers import AutoTokenizer

    from services.trainer.data import IGNORE, document_example, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    text = "The trial enrolled adults. Mortality was 12% in the treated group, lower than before."
    ids, labels = tokenize(
        document_example("d", text, focus=True, terms=("Mortality",)), tokenizer, 512
    )
    kept = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert "12% in the treated group" in kept and "Mortality" in kept
    assert "enrolled" not in kept and "lower than before" not in kept
    # A text with nothing key in it trains on every token (never an empty loss).
    ids, labels = tokenize(
        document_example("e", "Plain words only here.", focus=True), tokenizer, 512
    )
    assert labels == ids
