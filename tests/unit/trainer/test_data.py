"""Training data: the exchange the model trains on is the one it is asked in score mode;
de-duplication, the deterministic split, replay and the dataset hash."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from services.common.models import resolve_llm_dir
from services.common.settings import CommonSettings
from services.llm.chat import encode_prompt
from services.llm.prompts import Passage, build_prompt
from services.trainer.data import (
    IGNORE,
    Dataset,
    assemble,
    document_example,
    in_eval_split,
    qa_example,
    tokenize,
)
from services.trainer.evaluation import LABELS, load_items


@pytest.fixture(scope="module")
def llm_tokenizer():
    return AutoTokenizer.from_pretrained(
        resolve_llm_dir("SmolLM2-135M-Instruct", CommonSettings().cache_dir)
    )


def passages(item) -> list[Passage]:
    return [Passage(item.id, f"{item.id}#0", "", " ".join(item.contexts))]


def test_a_labelled_question_trains_the_exchange_score_mode_asks(pubmedqa, llm_tokenizer):
    item = load_items(pubmedqa)[0]
    example = qa_example(item, passages(item))
    # What the infer service sends for this question in score mode.
    asked = build_prompt(item.question, passages(item), candidates=list(LABELS))
    assert (example.system, example.prompt, example.target) == (
        asked.system,
        asked.user,
        item.label,
    )
    ids, labels = tokenize(example, llm_tokenizer, 1024)
    prompt_ids = encode_prompt(llm_tokenizer, asked.system, asked.user)
    assert ids[: len(prompt_ids)] == prompt_ids
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert llm_tokenizer.decode(trained).startswith(item.label)
    # The candidate score mode reads is the first trained token.
    assert trained[0] == llm_tokenizer(item.label, add_special_tokens=False)["input_ids"][0]


def test_long_prompts_keep_the_reply_and_documents_train_every_token(pubmedqa, llm_tokenizer):
    item = load_items(pubmedqa)[0]
    ids, labels = tokenize(qa_example(item, passages(item)), llm_tokenizer, 64)
    assert len(ids) == 64 and labels[-3:] != [IGNORE] * 3
    doc_ids, doc_labels = tokenize(document_example("d", "Aspirin is an NSAID."), llm_tokenizer, 64)
    assert doc_ids == doc_labels


def test_assemble_dedups_splits_and_hashes(pubmedqa):
    items = load_items(pubmedqa)
    examples = [qa_example(i, passages(i)) for i in items]
    replay = [document_example("old", "Earlier text."), examples[0]]
    data = assemble(examples + examples[:10], replay=replay, eval_share=0.2, seed=0)
    assert len(data.train) + len(data.eval) == 501  # 500 questions + 1 replayed document
    assert 60 <= len(data.eval) <= 140 and all(e.kind == "qa" for e in data.eval)
    assert data.provenance["replayed"] == 1 and data.provenance["counts"] == {
        "qa": 500,
        "document": 1,
    }
    held = {e.id for e in data.eval}
    assert held == {e.id for e in examples if in_eval_split(e.id, 0.2, 0)}
    # The same data in another order is the same dataset; other data is not.
    again = assemble(list(reversed(examples)), replay=replay, eval_share=0.2, seed=0)
    assert again.content_hash == data.content_hash and len(data.content_hash) == 16
    assert assemble(examples[1:], eval_share=0.2).content_hash != data.content_hash
    restored = Dataset.from_json(data.to_json())
    assert restored.train == data.train and restored.content_hash == data.content_hash
