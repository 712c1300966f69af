"""PubMedQA-style evaluation: yes/no/maybe questions answered in score mode (the model's
log-probability of each label as the answer), with or without retrieved evidence.

Shared by ``knowstream eval pubmedqa`` and the trainer's evaluation gate. The metric functions
are pure; :func:`evaluate` takes the ask and search calls as functions, so it runs against the
live services or against fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

LABELS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    label: str
    contexts: tuple[str, ...] = ()
    long_answer: str = ""


def load_items(data: dict[str, Any]) -> list[Item]:
    """Items of a PubMedQA-format file ({pmid: {QUESTION, CONTEXTS, final_decision, ...}});
    raises ValueError naming the first bad item."""
    if not isinstance(data, dict) or not data:
        raise ValueError("expected a JSON object of {id: item} in PubMedQA's format")
    items = []
    for key, raw in data.items():
        if not isinstance(raw, dict):
            raise ValueError(f"item {key}: not an object")
        question = raw.get("QUESTION")
        label = str(raw.get("final_decision", "")).strip().lower()
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"item {key}: no QUESTION")
        if label not in LABELS:
            raise ValueError(f"item {key}: final_decision {label!r} is not yes, no or maybe")
        contexts = raw.get("CONTEXTS") or []
        items.append(
            Item(
                id=str(key),
                question=question,
                label=label,
                contexts=tuple(str(c) for c in contexts),
                long_answer=str(raw.get("LONG_ANSWER", "")),
            )
        )
    return items


def metrics(golds: list[str], predictions: list[str]) -> dict[str, Any]:
    """Accuracy, per-label accuracy (recall of each gold label) and macro-F1 over the labels."""
    n = len(golds)
    correct = sum(g == p for g, p in zip(golds, predictions, strict=True))
    per_label: dict[str, float | None] = {}
    f1s = []
    for label in LABELS:
        gold = sum(g == label for g in golds)
        predicted = sum(p == label for p in predictions)
        hits = sum(g == p == label for g, p in zip(golds, predictions, strict=True))
        per_label[label] = round(hits / gold, 4) if gold else None
        precision = hits / predicted if predicted else 0.0
        recall = hits / gold if gold else 0.0
        if gold or predicted:
            f1s.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    return {
        "accuracy": round(correct / n, 4) if n else 0.0,
        "n": n,
        "per_label": per_label,
        "macro_f1": round(sum(f1s) / len(f1s), 4) if f1s else 0.0,
    }


@dataclass
class Answer:
    label: str
    confidence: float
    retrieved_ids: list[str]


AskFn = Callable[[Item], Answer]
SearchFn = Callable[[Item], list[str]]


def evaluate(
    items: list[Item],
    ask: AskFn,
    search: SearchFn | None = None,
    concurrency: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Asks every item (``concurrency`` at a time, so the server can batch them) and scores the
    answers; with ``search``, also the share of items whose own document is in the top 5."""

    def one(item: Item) -> tuple[Answer, bool | None]:
        answer = ask(item)
        found = item.id in search(item)[:5] if search is not None else None
        return answer, found

    results: list[tuple[Answer, bool | None]] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for i, result in enumerate(pool.map(one, items), start=1):
            results.append(result)
            if progress is not None:
                progress(i)
    out = metrics([i.label for i in items], [a.label for a, _ in results])
    found = [f for _, f in results if f is not None]
    out["retrieval_recall@5"] = round(sum(found) / len(found), 4) if found else None
    out["predicted"] = {label: sum(a.label == label for a, _ in results) for label in LABELS}
    return out


PAEDIATRIC = {"Child", "Infant", "Adolescent", "Child, Preschool", "Infant, Newborn"}


def mesh_groups(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Ids of adult-only and paediatric-only items of a PubMedQA-format file (by MeSH terms), in
    file order: two question populations the drift tests and benchmark switch between."""
    adult, child = [], []
    for key, item in data.items():
        meshes = set(item.get("MESHES", []))
        if "Adult" in meshes and not PAEDIATRIC & meshes:
            adult.append(key)
        elif "Adult" not in meshes and PAEDIATRIC & meshes:
            child.append(key)
    return adult, child
