"""The evaluation gate: a trained adapter is registered only if it answers the eval split at
least as well as the live adapter (plus a margin) and has not forgotten general English.

Accuracy is measured as users are served: score mode through Triton (the log-probability of
each label as the answer) on the eval examples' prompts, which hold the passages the retrieve
service returned for them. Forgetting is the rise in perplexity on a fixed general-English set
over the base model, measured by the training process right after training (it holds both).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common.knowledge import forgetting_check
from services.trainer.data import Example
from services.trainer.evaluation import LABELS, metrics

# (example, adapter id or "base") -> the chosen label
Score = Callable[[Example, str], Awaitable[str]]


@dataclass(frozen=True)
class Thresholds:
    min_gain: float  # accuracy units over live
    max_forgetting_pct: float
    min_eval_items: int


@dataclass
class GateMetrics:
    eval_items: int = 0
    accuracy: float = 0.0
    macro_f1: float = 0.0
    base_accuracy: float = 0.0
    live_accuracy: float = 0.0
    live_adapter: str = "base"
    base_perplexity: float = 0.0
    perplexity: float = 0.0
    predicted: dict[str, int] = field(default_factory=dict)

    @property
    def forgetting_pct(self) -> float:
        if self.base_perplexity <= 0:
            return 0.0
        return 100.0 * (self.perplexity - self.base_perplexity) / self.base_perplexity


def decide(m: GateMetrics, t: Thresholds) -> tuple[bool, list[str]]:
    """Whether the adapter passes, and one reason per check (passed or not)."""
    reasons = []
    passed = True
    if m.eval_items < t.min_eval_items:
        passed = False
        reasons.append(f"only {m.eval_items} eval items (the gate needs {t.min_eval_items})")
    gain = m.accuracy - m.live_accuracy
    ok = gain >= t.min_gain - 1e-9
    passed &= ok
    reasons.append(
        f"accuracy {m.accuracy:.3f} vs live ({m.live_adapter}) {m.live_accuracy:.3f}: "
        f"gain {gain:+.3f} {'>=' if ok else '<'} {t.min_gain:+.3f}"
        f" (base {m.base_accuracy:.3f}, {m.eval_items} items)"
    )
    ok, reason = forgetting_check(m.perplexity, m.base_perplexity, t.max_forgetting_pct)
    reasons.append(reason)
    return passed and ok, reasons


async def accuracy(
    examples: list[Example], adapter: str, score: Score, concurrency: int
) -> tuple[float, float, dict[str, int]]:
    """(accuracy, macro-F1, predicted label counts) of an adapter on labelled examples."""
    gate = asyncio.Semaphore(concurrency)

    async def one(example: Example) -> str:
        async with gate:
            return await score(example, adapter)

    predictions = await asyncio.gather(*(one(e) for e in examples))
    result = metrics([e.target for e in examples], list(predictions))
    counts = {label: predictions.count(label) for label in LABELS}
    return float(result["accuracy"]), float(result["macro_f1"]), counts


Result = tuple[float, float, dict[str, int]]
# (eval-set key, adapter) -> a stored result, and the store for one
Recall = Callable[[str, str], Awaitable[Result | None]]
Remember = Callable[[str, str, Result], Awaitable[None]]


def eval_key(examples: list[Example]) -> str:
    """Identity of an eval set: the same questions with the same prompts."""
    digest = hashlib.sha256()
    for key in sorted(e.content_key for e in examples):
        digest.update(key.encode())
    return digest.hexdigest()[:16]


async def measure(
    examples: list[Example],
    candidate: str,
    live: str,
    score: Score,
    concurrency: int,
    perplexities: tuple[float, float],
    recall: Recall | None = None,
    remember: Remember | None = None,
) -> GateMetrics:
    """Accuracy of the candidate, the live adapter and the base model on the same examples
    (live and base once when they are the same). Results of registered adapters and the base
    model on an eval set can be recalled instead of asked again: adapters never change (their
    id is their content hash) and the split is the same in every job."""
    qa = [e for e in examples if e.kind == "qa"]
    m = GateMetrics(eval_items=len(qa), live_adapter=live)
    m.base_perplexity, m.perplexity = perplexities
    if not qa:
        return m
    key = eval_key(qa)

    async def known(adapter: str) -> Result:
        found = await recall(key, adapter) if recall else None
        if found is None:
            found = await accuracy(qa, adapter, score, concurrency)
            if remember:
                await remember(key, adapter, found)
        return found

    m.accuracy, m.macro_f1, m.predicted = await accuracy(qa, candidate, score, concurrency)
    m.base_accuracy = (await known("base"))[0]
    m.live_accuracy = m.base_accuracy if live == "base" else (await known(live))[0]
    return m
