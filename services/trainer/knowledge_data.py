"""A knowledge job's data: the documents the stream brought (read back from the chunk topic),
split into those the adapter trains on and control documents it never sees, their probes by
tier, and the training text: every trained document in several forms (services/trainer/
augment.py) plus a replay of older documents, so successive adapters keep what their parents
learned.

Plain data and async functions taking the scorer as an argument: runs against Triton in the
service and against fakes in the tests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.knowledge import (
    Limits,
    ProbeSet,
    ScoreFn,
    build_probe_set,
    probe_pools,
    split_control,
)
from services.common.probes import Document, document_terms, pubmedqa_document, sentences
from services.trainer.augment import Augmentation, augment
from services.trainer.data import Dataset, Example, assemble, document_example
from services.trainer.recent import RecentChunk
from services.trainer.sources import offset_ranges


@dataclass(frozen=True)
class KnowledgeRecipe:
    augmentation: Augmentation = field(default_factory=Augmentation)
    # Share of the new documents held out as Tier C (by id: a document is control in every job).
    control_share: float = 0.2
    max_documents: int = 200
    probes_per_document: int = 4
    limits: Limits = field(default_factory=Limits)
    # Older documents replayed (raw form) per new trained document.
    replay_share: float = 0.3
    # New documents train on their key spans only (data.focus_ranges); replay on all text.
    span_loss: bool = True
    # General text the retention tier probes beside older documents (characters).
    general_chars: int = 40_000
    seed: int = 0


@dataclass
class KnowledgeData:
    dataset: Dataset
    probes: ProbeSet
    trained: list[Document] = field(default_factory=list)
    control: list[Document] = field(default_factory=list)


def documents_from_chunks(
    chunks: Sequence[RecentChunk], known: dict[str, Document] | None = None
) -> list[Document]:
    """Whole documents from their chunks (newest version only, as read): chunks in order, the
    sentences their overlap repeats dropped; tags as terms. Restatements come from ``known``
    (documents of a file, e.g. PubMedQA items with their conclusions) when it has the id."""
    by_doc: dict[str, list[RecentChunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    out = []
    newest: dict[str, int] = {}
    for doc_id, parts in by_doc.items():
        newest[doc_id] = max(c.timestamp_ms for c in parts)
        parts.sort(key=lambda c: c.chunk_index)
        seen: list[str] = []
        for c in parts:
            for s in sentences(c.text):
                if s not in seen[-8:]:  # overlap repeats the last sentences of the previous one
                    seen.append(s)
        twin = (known or {}).get(doc_id)
        terms = tuple(parts[0].tags) or (twin.terms if twin else ())
        out.append(
            Document(
                id=doc_id,
                text=" ".join(seen),
                terms=terms,
                restatements=twin.restatements if twin else (),
            )
        )
    out.sort(key=lambda d: (-newest[d.id], d.id))  # newest first: what a cap keeps
    return out


def known_documents(path: str) -> dict[str, Document]:
    """Documents of a PubMedQA-format file by id ({} when there is none): where the stream's
    documents come from it, their conclusions and questions are Tier-P text."""
    if not path or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_bytes())
    if not isinstance(data, dict):
        return {}
    return {str(k): pubmedqa_document(k, v) for k, v in data.items() if isinstance(v, dict)}


def training_examples(
    trained: Sequence[Document], older: Sequence[Document], recipe: KnowledgeRecipe
) -> tuple[list[Example], list[Example]]:
    """(new examples, replayed examples): each trained document in every augmented form, and
    the raw text of a seeded sample of older documents."""
    new = []
    for doc in trained:
        terms = document_terms(doc)
        for i, form in enumerate(augment(doc, recipe.augmentation)):
            new.append(
                document_example(
                    f"{doc.id}:{form.kind}:{i}",
                    form.text,
                    focus=recipe.span_loss,
                    terms=tuple(terms),
                )
            )
    want = round(recipe.replay_share * len(trained))
    sample = random.Random(recipe.seed).sample(list(older), min(want, len(older)))
    replay = [document_example(f"{d.id}:replay", d.text) for d in sample]
    return new, replay


async def build_knowledge_data(
    new_documents: Sequence[Document],
    older_documents: Sequence[Document],
    parent: str,
    score: ScoreFn,
    recipe: KnowledgeRecipe,
    provenance: dict[str, Any] | None = None,
    concurrency: int = 8,
) -> KnowledgeData:
    """The dataset and probe set of a knowledge job. ValueError when the stream brought nothing
    to train on."""
    docs = list(new_documents)[: recipe.max_documents]
    if not docs:
        raise ValueError("no new documents to learn from")
    trained, control = split_control(docs, recipe.control_share)
    if not trained:
        raise ValueError(f"all {len(docs)} new documents are control documents")
    learn, retention = probe_pools(
        docs,
        {d.id for d in trained},
        list(older_documents),
        recipe.general_chars,
        recipe.seed,
        recipe.probes_per_document,
    )
    probe_set = await build_probe_set(learn, retention, parent, score, recipe.limits, concurrency)
    new, replay = training_examples(trained, older_documents, recipe)
    info = {
        "knowledge": {
            "trained_documents": [d.id for d in trained],
            "control_documents": [d.id for d in control],
            "versions": {d.id: d.version for d in docs},
            "replayed_documents": len(replay),
            "forms": _count_forms(new),
            "probes": probe_set.sizes,
            "probe_candidates": probe_set.candidates,
            "probe_set": probe_set.digest,
            "augmentation": {
                "shuffles": recipe.augmentation.shuffles,
                "restatements": recipe.augmentation.restatements,
                "qa_pairs": recipe.augmentation.qa_pairs,
            },
        },
        **(provenance or {}),
    }
    dataset = assemble(new, replay, eval_share=0.0, seed=recipe.seed, provenance=info)
    dataset.provenance["replay_ids"] = [e.id for e in replay]
    return KnowledgeData(dataset, probe_set, trained, control)


def _count_forms(examples: Sequence[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in examples:
        kind = e.id.rsplit(":", 2)[-2]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def recent_provenance(chunks: Sequence[RecentChunk], since_ms: int) -> dict[str, Any]:
    return {
        "recent_documents": {
            "since_ms": since_ms,
            "chunks": len(chunks),
            "documents": len({c.doc_id for c in chunks}),
            "offsets": offset_ranges([c.offset for c in chunks]),
        }
    }
