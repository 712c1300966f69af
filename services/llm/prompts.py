"""Prompt templates: retrieved passages numbered [1]..[n] so the answer can cite them."""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM = (
    "You are a careful assistant for domain experts. Answer from the numbered context passages "
    "and cite the passages you use as [1], [2]. If the context does not answer the question, "
    "say so."
)
SYSTEM_NO_CONTEXT = "You are a careful assistant for domain experts. Answer concisely."
INSTRUCTIONS = {
    "cited": "Answer briefly and cite the passages you used.",
    "step_by_step": (
        "Think step by step: first say what each relevant passage shows, citing it, "
        "then give the answer in one sentence."
    ),
}
TEMPLATES = tuple(INSTRUCTIONS)
CITATION = re.compile(r"\[(\d{1,2})\]")


@dataclass
class Passage:
    doc_id: str
    chunk_id: str
    title: str
    text: str
    score: float = 0.0


@dataclass
class Prompt:
    system: str
    user: str
    # Passages that made it into the prompt, in their numbered order.
    passages: list[Passage]


def build_prompt(
    question: str,
    passages: list[Passage],
    template: str = "cited",
    max_context_chars: int = 4000,
    candidates: list[str] | None = None,
) -> Prompt:
    """Numbers the passages (best first) until the context budget is spent; a passage that
    does not fit whole is cut, never dropped silently from the middle."""
    if template not in INSTRUCTIONS:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    used: list[Passage] = []
    blocks: list[str] = []
    budget = max_context_chars
    for passage in passages:
        if budget <= 0:
            break
        header = f"[{len(used) + 1}] {passage.title}\n" if passage.title else f"[{len(used) + 1}] "
        body = passage.text[: max(0, budget - len(header))]
        if not body:
            break
        blocks.append(header + body)
        used.append(passage)
        budget -= len(header) + len(body)
    ask = f"Answer with one of: {', '.join(candidates)}." if candidates else INSTRUCTIONS[template]
    if not used:
        return Prompt(SYSTEM_NO_CONTEXT, f"Question: {question}\n{ask}", [])
    context = "\n\n".join(blocks)
    return Prompt(SYSTEM, f"Context:\n{context}\n\nQuestion: {question}\n{ask}", used)


def referenced_numbers(answer: str) -> set[int]:
    return {int(n) for n in CITATION.findall(answer)}
