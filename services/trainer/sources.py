"""A job's dataset from its sources: labelled questions with the passages the retrieve service
finds for them (so training sees what serving will show), continued-pretraining text (passages
retrieved for the domain questions of a retrain request, and documents ingested recently, read
back from the chunk topic), users' corrections, and a replay sample of the parent adapter's
training data.

Retrieval comes in as a function, so this runs against the live retrieve service or a fake.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.llm.prompts import Passage
from services.trainer.data import (
    Dataset,
    Example,
    assemble,
    correction_example,
    document_example,
    in_eval_split,
    qa_example,
)
from services.trainer.evaluation import Item, load_items
from services.trainer.recent import RecentChunk
from services.trainer.store import Correction

Search = Callable[[str, int], Awaitable[list[Passage]]]


@dataclass
class Sources:
    labelled_path: str = ""
    limit: int = 0
    # Domain questions (a retrain request's examples): their passages become documents.
    questions: list[str] = field(default_factory=list)
    corrections: list[Correction] = field(default_factory=list)
    parent_dataset: Dataset | None = None
    # Chunks published since recent_since_ms (services/trainer/recent.py).
    recent: list[RecentChunk] = field(default_factory=list)
    recent_since_ms: int = 0


@dataclass(frozen=True)
class Recipe:
    k: int  # passages per question, as the infer service retrieves
    max_context_chars: int  # the infer service's context budget: eval prompts are served ones
    # Context budget of training prompts: the best-ranked passages in the same format, fewer of
    # them (training cost grows with prompt length; the first passage carries most answers).
    train_context_chars: int
    # Train on "label. long answer" where the item has one (the score is still read from the
    # label, the first word): the reasoning gives each example far more signal than one token.
    with_reasons: bool
    domain_k: int
    max_documents: int
    # Most recently ingested chunks per job (the newest; documents already in the labelled
    # questions' prompts are left out).
    max_recent_documents: int
    replay_share: float
    eval_share: float
    seed: int
    concurrency: int


def read_labelled(path: str, limit: int = 0) -> tuple[list[Item], str]:
    """Items of a PubMedQA-format file and the file's sha256 (16 hex); ValueError naming the
    problem when it cannot be used."""
    try:
        raw = Path(path).read_bytes()
        items = load_items(json.loads(raw))
    except OSError as exc:
        raise ValueError(f"labelled data {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ValueError(f"labelled data {path}: {exc}") from exc
    return (items[:limit] if limit else items), hashlib.sha256(raw).hexdigest()[:16]


async def gather_limited(coros: list[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(make: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await make()

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def build_dataset(sources: Sources, recipe: Recipe, search: Search) -> Dataset:
    """Labelled questions and corrections with their retrieved passages, documents (domain and
    recently ingested) as continued-pretraining text, and a replay share of the parent's
    training set, each part described in the provenance."""
    provenance: dict[str, Any] = {}
    items: list[Item] = []
    if sources.labelled_path:
        items, digest = read_labelled(sources.labelled_path, sources.limit)
        provenance["labelled"] = {
            "path": sources.labelled_path,
            "sha256": digest,
            "items": len(items),
        }

    def retrieve(question: str, k: int) -> Callable[[], Awaitable[list[Passage]]]:
        return lambda: search(question, k)

    found_for_items = await gather_limited(
        [retrieve(i.question, recipe.k) for i in items], recipe.concurrency
    )
    examples, provenance["context_fallback"] = _labelled_examples(items, found_for_items, recipe)
    corrections = sources.corrections
    found = await gather_limited(
        [retrieve(c.question, recipe.k) for c in corrections], recipe.concurrency
    )
    for c, passages in zip(corrections, found, strict=True):
        examples.append(
            correction_example(
                c.request_id, c.question, c.correction, passages, recipe.train_context_chars
            )
        )
    if corrections:
        provenance["corrections"] = {
            "count": len(corrections),
            "offsets": offset_ranges([c.offset for c in corrections]),
        }
    documents: dict[str, Example] = {}
    if recipe.domain_k and sources.questions:
        found = await gather_limited(
            [retrieve(q, recipe.domain_k) for q in sources.questions], recipe.concurrency
        )
        _add_domain_documents(documents, found, recipe.max_documents)
        provenance["domain_questions"] = len(sources.questions)
    if sources.recent_since_ms and recipe.max_recent_documents:
        in_prompts = {p.doc_id for passages in found_for_items for p in passages}
        provenance["recent_documents"] = _add_recent_documents(
            documents, sources, in_prompts, recipe.max_recent_documents
        )
    examples += documents.values()
    replay: list[Example] = []
    parent = sources.parent_dataset
    if parent is not None and recipe.replay_share > 0:
        want = round(recipe.replay_share * len(examples))
        rng = random.Random(recipe.seed)
        replay = rng.sample(parent.train, min(want, len(parent.train)))
        provenance["parent_dataset"] = parent.content_hash
    dataset = assemble(examples, replay, recipe.eval_share, recipe.seed, provenance)
    dataset.provenance["replay_ids"] = [e.id for e in replay]
    return dataset


def _labelled_examples(
    items: list[Item], found: list[list[Passage]], recipe: Recipe
) -> tuple[list[Example], int]:
    """A prompt per labelled question with its retrieved passages, or the item's own abstract
    when the knowledge base does not hold it (counted, the second value: such a prompt differs
    from what serving would build)."""
    examples: list[Example] = []
    fallback = 0
    for item, passages in zip(items, found, strict=True):
        if not passages and item.contexts:
            fallback += 1
            passages = [Passage(item.id, "", "", " ".join(item.contexts))]
        held_out = in_eval_split(f"qa:{item.id}", recipe.eval_share, recipe.seed)
        budget = recipe.max_context_chars if held_out else recipe.train_context_chars
        examples.append(
            qa_example(item, passages, budget, with_reason=recipe.with_reasons and not held_out)
        )
    return examples, fallback


def _add_domain_documents(
    documents: dict[str, Example], found: list[list[Passage]], limit: int
) -> None:
    """The passages retrieved for the domain's questions, each chunk once, up to ``limit``."""
    for passages in found:
        for p in passages:
            key = p.chunk_id or p.doc_id
            if len(documents) < limit and key not in documents:
                documents[key] = document_example(key, f"{p.title}\n{p.text}".strip())


def _add_recent_documents(
    documents: dict[str, Example], sources: Sources, in_prompts: set[str], limit: int
) -> dict[str, Any]:
    """The newest recently ingested chunks not already in a labelled prompt, up to ``limit``;
    returns their provenance."""
    fresh = [chunk for chunk in sources.recent if chunk.doc_id not in in_prompts]
    fresh.sort(key=lambda chunk: chunk.timestamp_ms, reverse=True)
    used: list[RecentChunk] = []
    for chunk in fresh:
        if len(used) >= limit:
            break
        if chunk.chunk_id not in documents:
            documents[chunk.chunk_id] = document_example(
                chunk.chunk_id, f"{chunk.title}\n{chunk.text}".strip()
            )
            used.append(chunk)
    return {
        "since_ms": sources.recent_since_ms,
        "read": len(sources.recent),
        "in_prompts": len(sources.recent) - len(fresh),
        "used": len(used),
        "offsets": offset_ranges([chunk.offset for chunk in used]),
    }


def offset_ranges(offsets: list[str]) -> dict[str, list[int]]:
    """{"topic:partition": [first offset, last offset]} of "<topic>:<partition>:<offset>"s."""
    ranges: dict[str, list[int]] = {}
    for where in offsets:
        topic_partition, _, offset = where.rpartition(":")
        n = int(offset)
        lo, hi = ranges.get(topic_partition, [n, n])
        ranges[topic_partition] = [min(lo, n), max(hi, n)]
    return ranges
