"""Training data: examples from labelled questions, feedback corrections and domain documents,
a replay sample of earlier data, de-duplicated, split deterministically and hashed.

Labelled questions become the exact exchange the model is later asked in score mode: the same
system prompt, the numbered passages and the "Answer with one of: yes, no, maybe." instruction
(services/llm/prompts.py), and the label as the assistant's reply. Documents are
continued-pretraining text. Everything here is plain data; tokenisation uses the model's chat
template through services/llm/chat.py, as the engine does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from services.llm.chat import encode_exchange
from services.llm.prompts import Passage, build_prompt
from services.trainer.evaluation import LABELS, Item

Kind = Literal["qa", "correction", "document"]
IGNORE = -100  # label of tokens the loss skips (the prompt)


@dataclass(frozen=True)
class Example:
    id: str  # stable across runs: "<source>:<key>"
    kind: Kind
    system: str
    prompt: str  # the user turn; empty for documents
    target: str  # the assistant's reply, or the document text
    # The question asked (qa and corrections): what the monitor compares live questions with.
    question: str = ""
    # Documents: train only on their key spans (numbers, these terms) and the rest of each
    # span's clause, the salient-span loss of REALM (Guu et al., 2020), instead of every token.
    focus: bool = False
    terms: tuple[str, ...] = ()

    @property
    def content_key(self) -> str:
        """What de-duplication compares: the text the model trains on, not where it came from."""
        body = json.dumps([self.kind, self.system, self.prompt, self.target])
        return hashlib.sha256(body.encode()).hexdigest()


def qa_example(
    item: Item, passages: list[Passage], max_context_chars: int = 4000, with_reason: bool = False
) -> Example:
    prompt = build_prompt(
        item.question, passages, max_context_chars=max_context_chars, candidates=list(LABELS)
    )
    target = item.label
    if with_reason and item.long_answer:
        target = f"{item.label}. {item.long_answer}"
    return Example(f"qa:{item.id}", "qa", prompt.system, prompt.user, target, item.question)


def correction_example(
    request_id: str,
    question: str,
    correction: str,
    passages: list[Passage],
    max_context_chars: int = 4000,
) -> Example:
    """A user's corrected answer to a question, as an instruction example."""
    prompt = build_prompt(question, passages, max_context_chars=max_context_chars)
    return Example(
        f"feedback:{request_id}", "correction", prompt.system, prompt.user, correction, question
    )


def document_example(
    doc_id: str, text: str, focus: bool = False, terms: tuple[str, ...] = ()
) -> Example:
    return Example(f"doc:{doc_id}", "document", "", "", text, focus=focus, terms=tuple(terms))


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    # sha256 over the sorted content keys of train and eval (16 hex): the dataset's identity.
    content_hash: str
    # Where the data came from: counts per kind, replayed examples, Kafka offsets, files.
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "content_hash": self.content_hash,
            "provenance": self.provenance,
            "train": [asdict(e) for e in self.train],
            "eval": [asdict(e) for e in self.eval],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dataset:
        return cls(
            train=[_example(e) for e in data["train"]],
            eval=[_example(e) for e in data["eval"]],
            content_hash=data["content_hash"],
            provenance=data.get("provenance", {}),
        )


def _example(raw: dict[str, Any]) -> Example:
    return Example(**{**raw, "terms": tuple(raw.get("terms", ()))})


def focus_ranges(text: str, terms: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character ranges of a text's key spans with the rest of their clause (what probes ask)."""
    from services.common.probes import clause_rest, number_spans, term_spans

    out = []
    for span in number_spans(text) + term_spans(text, terms):
        out.append((span.start, span.end + len(clause_rest(text[span.end :]))))
    return out


def in_eval_split(example_id: str, eval_share: float, seed: int = 0) -> bool:
    """Deterministic split by id: the same item is always on the same side, whatever else is
    in the dataset (so an adapter's evaluation never includes what it was trained on)."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_share


def assemble(
    examples: Iterable[Example],
    replay: Iterable[Example] = (),
    eval_share: float = 0.2,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> Dataset:
    """De-duplicates by content (first occurrence wins; new data before replayed data), splits
    labelled questions into train/eval by id, and hashes the result. Replayed examples and
    non-QA examples only ever train."""
    seen: set[str] = set()
    train: list[Example] = []
    held: list[Example] = []
    counts: dict[str, int] = {}
    replayed = 0
    for example, is_replay in [(e, False) for e in examples] + [(e, True) for e in replay]:
        key = example.content_key
        if key in seen:
            continue
        seen.add(key)
        if example.kind == "qa" and not is_replay and in_eval_split(example.id, eval_share, seed):
            held.append(example)
        else:
            train.append(example)
            replayed += is_replay
        counts[example.kind] = counts.get(example.kind, 0) + 1
    digest = hashlib.sha256()
    for key in sorted(e.content_key for e in train + held):
        digest.update(key.encode())
    info = {"counts": counts, "replayed": replayed, "eval_share": eval_share, "seed": seed}
    info.update(provenance or {})
    return Dataset(train, held, digest.hexdigest()[:16], info)


def tokenize(example: Example, tokenizer: Any, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the loss covers the reply of an exchange, or the whole document.
    Long prompts are cut from the left of the context, never the reply."""
    if example.kind == "document" and example.focus:
        encoded = tokenizer(example.target, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])[:max_tokens]
        ranges = focus_ranges(example.target, example.terms)
        labels = [
            t if end > start and any(start < b and a < end for a, b in ranges) else IGNORE
            for t, (start, end) in zip(ids, encoded["offset_mapping"], strict=False)
        ]
        if any(t != IGNORE for t in labels):
            return ids, labels
        return ids, list(ids)  # nothing key in it (or cut off): the text as a whole
    if example.kind == "document":
        ids = list(tokenizer(example.target, add_special_tokens=True)["input_ids"])[:max_tokens]
        return ids, list(ids)
    prompt, reply = encode_exchange(tokenizer, example.system, example.prompt, example.target)
    reply = reply[:max_tokens]
    prompt = (
        prompt[-(max_tokens - len(reply)) :] if len(prompt) + len(reply) > max_tokens else prompt
    )
    return prompt + reply, [IGNORE] * len(prompt) + reply
