"""Knowledge evaluation: the probe tiers, their accuracies and the statistics the gate decides
on, shared by the trainer's gate, ``knowstream eval knowledge`` and ``bench.learning``.

Tiers (see services/common/probes.py for the probes themselves):

* **M**: sentences of the documents an adapter trained on;
* **P**: the same facts stated in text it never trained on (a PubMedQA conclusion or question);
* **C**: control: documents of the same stream it did not train on, probed the same way. C
  separates learning the documents from drift in the domain and from regression to the mean:
  keeping only probes a model gets wrong selects probes where it was unlucky, and some of those
  come right under any small change of the weights;
* **R**: retention: probes of older documents and of general text that the base model ranks
  right by a clear margin.

M, P and C keep only probes the parent (live) model gets wrong ("to-learn"), so each tier's
accuracy under the parent is 0 and under the adapter is its gain. The scoring is a function
(prompt, candidates, adapter) -> log-probabilities: Triton's score mode in the services, torch
in the training child.

Over 400 lines because the tiers, their scoring and the gate's statistics are one definition
that the gate, `knowstream eval knowledge` and bench.learning must share exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.probes import Document, Probe, probe_documents

TIERS = ("M", "P", "C", "R")
CONTROL_PROBES_FACTOR = 3
# (prompt, candidates, adapter) -> log-probability of each candidate
ScoreFn = Callable[[str, list[str], str], Awaitable[list[float]]]


def chosen(logprobs: Sequence[float]) -> int:
    return max(range(len(logprobs)), key=logprobs.__getitem__)


def margin(logprobs: Sequence[float]) -> float:
    """How far the true candidate (the first) is ahead of the best distractor (nats)."""
    return float(logprobs[0] - max(logprobs[1:]))


async def score_probes(
    probes: Sequence[Probe], adapter: str, score: ScoreFn, concurrency: int = 8
) -> list[list[float]]:
    """Log-probabilities of every probe's candidates under one adapter, ``concurrency`` probes
    in flight (so Triton batches them)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(probe: Probe) -> list[float]:
        async with gate:
            return list(await score(probe.prefix, probe.candidates, adapter))

    return list(await asyncio.gather(*(one(p) for p in probes)))


def in_share(key: str, share: float, salt: str = "") -> bool:
    """Deterministic membership by hash: the same key is always on the same side."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def split_control(docs: Sequence[Document], share: float) -> tuple[list[Document], list[Document]]:
    """(trained, control): a document is control by its id, so it is control in every job and
    every evaluation (an adapter is never scored as control on what an ancestor trained on)."""
    train = [d for d in docs if not in_share(d.id, share, "control")]
    control = [d for d in docs if in_share(d.id, share, "control")]
    return train, control


def general_documents(chars: int) -> list[Document]:
    """General English shipped with Python (pydoc's topics, also the perplexity set) in
    paragraphs of about 1,500 characters: what the base model knows of ordinary prose."""
    if chars <= 0:
        return []
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:chars]
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    out: list[Document] = []
    buffer = ""
    for p in paragraphs:
        buffer = f"{buffer} {' '.join(p.split())}".strip()
        if len(buffer) >= 1500:
            out.append(Document(id=f"general:{len(out)}", text=buffer))
            buffer = ""
    return out


def probe_pools(
    docs: Sequence[Document],
    trained_ids: set[str],
    older: Sequence[Document],
    general_chars: int,
    seed: int,
    per_document: int,
) -> tuple[dict[str, list[Probe]], list[Probe]]:
    """Candidate probes by tier before filtering: M and P from the trained documents' text and
    restatements, C from the others' text; retention candidates from older documents and
    general text."""
    context = list(docs) + list(older)
    trained = [d for d in docs if d.id in trained_ids]
    control = [d for d in docs if d.id not in trained_ids]
    learn: dict[str, list[Probe]] = {"M": [], "P": [], "C": []}
    for p in probe_documents(trained, context, seed, per_document):
        learn["M" if p.origin == "text" else "P"].append(p)
    # Control documents are a fifth of the batch: three times the probes each, so tier C is not
    # the tier whose size decides the gate's uncertainty.
    for p in probe_documents(control, context, seed, CONTROL_PROBES_FACTOR * per_document):
        if p.origin == "text":
            learn["C"].append(p)
    general = general_documents(general_chars)
    retention = [
        p
        for p in probe_documents(list(older) + general, (), seed, per_document)
        if p.origin == "text"
    ]
    return learn, retention


@dataclass
class ProbeSet:
    """The probes of one evaluation, by tier, with the dev split of Tier M that training may
    use for early stopping (the gate never sees it)."""

    tiers: dict[str, list[Probe]] = field(default_factory=lambda: {t: [] for t in TIERS})
    dev: list[Probe] = field(default_factory=list)
    # Probes looked at per tier before filtering (to-learn / retained), for the record.
    candidates: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "tiers": {t: [p.to_json() for p in ps] for t, ps in self.tiers.items()},
            "dev": [p.to_json() for p in self.dev],
            "candidates": self.candidates,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ProbeSet:
        return cls(
            tiers={t: [Probe.from_json(p) for p in raw["tiers"].get(t, [])] for t in TIERS},
            dev=[Probe.from_json(p) for p in raw.get("dev", [])],
            candidates=dict(raw.get("candidates", {})),
        )

    @property
    def sizes(self) -> dict[str, int]:
        return {**{t: len(ps) for t, ps in self.tiers.items()}, "dev": len(self.dev)}

    @property
    def digest(self) -> str:
        body = "|".join(f"{t}:{','.join(sorted(p.id for p in ps))}" for t, ps in self.tiers.items())
        return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Limits:
    max_per_tier: int = 150
    dev_share: float = 0.2
    retention_margin: float = 1.0  # nats the base model's true candidate must lead by
    seed: int = 0


def _cap(probes: list[Probe], n: int, seed: int) -> list[Probe]:
    if len(probes) <= n:
        return probes
    keep = set(random.Random(seed).sample(range(len(probes)), n))
    return [p for i, p in enumerate(probes) if i in keep]


async def build_probe_set(
    learn: dict[str, list[Probe]],
    retention: list[Probe],
    parent: str,
    score: ScoreFn,
    limits: Limits = Limits(),
    concurrency: int = 8,
) -> ProbeSet:
    """Keeps the to-learn probes of tiers M, P, C (those ``parent`` gets wrong) and the
    retention probes the base model ranks right by ``limits.retention_margin``; splits a dev
    share off Tier M (by probe id). Candidates are capped before scoring, so the cost is
    bounded whatever the stream brought."""
    out = ProbeSet()
    for tier in ("M", "P", "C"):
        pool = _cap(learn.get(tier, []), limits.max_per_tier * 3, limits.seed)
        out.candidates[tier] = len(pool)
        scored = await score_probes(pool, parent, score, concurrency)
        wrong = [p for p, lp in zip(pool, scored, strict=True) if chosen(lp) != 0]
        if tier == "M":
            out.dev = [p for p in wrong if in_share(p.id, limits.dev_share, "dev")]
            wrong = [p for p in wrong if not in_share(p.id, limits.dev_share, "dev")]
        out.tiers[tier] = _cap(wrong, limits.max_per_tier, limits.seed)
    out.dev = _cap(out.dev, max(10, limits.max_per_tier // 3), limits.seed)
    pool = _cap(retention, limits.max_per_tier * 2, limits.seed)
    out.candidates["R"] = len(pool)
    scored = await score_probes(pool, "base", score, concurrency)
    kept = [p for p, lp in zip(pool, scored, strict=True) if margin(lp) >= limits.retention_margin]
    out.tiers["R"] = _cap(kept, limits.max_per_tier, limits.seed)
    return out


def correct(logprobs: Sequence[Sequence[float]]) -> list[int]:
    return [int(chosen(lp) == 0) for lp in logprobs]


def share(values: Sequence[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def bootstrap_lower_bound(
    a: Sequence[int], b: Sequence[int], seed: int = 0, rounds: int = 2000, level: float = 0.95
) -> float:
    """Lower bound of the two-sided ``level`` interval of mean(a) - mean(b) by the bootstrap.

    ``a`` and ``b`` are per-probe gains of the adapter over its parent on two tiers (each probe
    paired with itself under both models: on to-learn probes the parent's score is 0, so a gain
    is the adapter's correctness); each tier is resampled on its own, as the tiers hold different
    probes. -1 when a tier is empty (no evidence is no gain)."""
    if not a or not b:
        return -1.0
    rng = random.Random(seed)
    na, nb = len(a), len(b)
    diffs = sorted(
        sum(a[rng.randrange(na)] for _ in range(na)) / na
        - sum(b[rng.randrange(nb)] for _ in range(nb)) / nb
        for _ in range(rounds)
    )
    return diffs[int((1 - level) / 2 * rounds)]


@dataclass
class TierScores:
    """Per-probe correctness of one model on every tier."""

    correct: dict[str, list[int]] = field(default_factory=dict)

    def accuracy(self, tier: str) -> float:
        return share(self.correct.get(tier, []))

    def summary(self) -> dict[str, float]:
        return {t: round(self.accuracy(t), 4) for t in TIERS}


async def score_tiers(
    probes: ProbeSet, adapter: str, score: ScoreFn, concurrency: int = 8
) -> TierScores:
    out = TierScores()
    for tier, ps in probes.tiers.items():
        out.correct[tier] = correct(await score_probes(ps, adapter, score, concurrency))
    return out


@dataclass(frozen=True)
class KnowledgeThresholds:
    # The 95% lower bound of (tier - C) must exceed this, for M and for P.
    min_lower_bound: float = 0.0
    min_retention: float = 0.9
    max_forgetting_pct: float = 2.0
    min_probes: int = 5  # fewest to-learn probes in M (and C) a decision is taken on


@dataclass
class KnowledgeMetrics:
    adapter: TierScores
    sizes: dict[str, int]
    lower_bounds: dict[str, float]  # "M-C", "P-C"
    base_perplexity: float = 0.0
    perplexity: float = 0.0

    @property
    def forgetting_pct(self) -> float:
        if self.base_perplexity <= 0:
            return 0.0
        return 100.0 * (self.perplexity - self.base_perplexity) / self.base_perplexity


def knowledge_metrics(
    adapter: TierScores, perplexities: tuple[float, float] = (0.0, 0.0), seed: int = 0
) -> KnowledgeMetrics:
    c = adapter.correct.get("C", [])
    bounds = {
        f"{t}-C": round(bootstrap_lower_bound(adapter.correct.get(t, []), c, seed), 4)
        for t in ("M", "P")
    }
    return KnowledgeMetrics(
        adapter=adapter,
        sizes={t: len(adapter.correct.get(t, [])) for t in TIERS},
        lower_bounds=bounds,
        base_perplexity=perplexities[0],
        perplexity=perplexities[1],
    )


def decide_knowledge(m: KnowledgeMetrics, t: KnowledgeThresholds) -> tuple[bool, list[str]]:
    """Whether an adapter learned: Tier M and Tier P above Tier C by a bootstrap 95% lower bound
    above ``min_lower_bound``, Tier R kept, general English not forgotten. One reason per check,
    each naming its figures."""
    passed = True
    reasons = []
    for tier in ("M", "C"):
        if m.sizes.get(tier, 0) < t.min_probes:
            passed = False
            reasons.append(
                f"only {m.sizes.get(tier, 0)} to-learn probes in tier {tier} "
                f"(the gate needs {t.min_probes})"
            )
    acc = m.adapter.accuracy
    for tier in ("M", "P"):
        lb = m.lower_bounds[f"{tier}-C"]
        ok = lb > t.min_lower_bound
        passed &= ok
        reasons.append(
            f"tier {tier} {acc(tier):.3f} vs control {acc('C'):.3f} on to-learn probes "
            f"(n={m.sizes.get(tier, 0)} vs {m.sizes.get('C', 0)}): 95% lower bound of the gain "
            f"{lb:+.3f} {'>' if ok else '<='} {t.min_lower_bound:+.3f}"
        )
    if m.sizes.get("R", 0):
        ok = acc("R") >= t.min_retention - 1e-9
        passed &= ok
        reasons.append(
            f"tier R (retention, n={m.sizes['R']}) {acc('R'):.3f} "
            f"{'>=' if ok else '<'} {t.min_retention:.3f}"
        )
    else:
        reasons.append("tier R: no retention probes (not checked)")
    ok, reason = forgetting_check(m.perplexity, m.base_perplexity, t.max_forgetting_pct)
    reasons.append(reason)
    return passed and ok, reasons


def forgetting_check(perplexity: float, base: float, max_pct: float) -> tuple[bool, str]:
    """Whether general-English perplexity rose at most ``max_pct`` percent over the base
    model's, and the reason naming both (shared by the knowledge and the labelled gate)."""
    rise = 100.0 * (perplexity - base) / base if base > 0 else 0.0
    ok = rise <= max_pct + 1e-9
    return ok, (
        f"general-English perplexity {perplexity:.3f} vs base {base:.3f}: "
        f"{rise:+.2f}% {'<=' if ok else '>'} {max_pct:.2f}%"
    )


def interval(values: Sequence[int], seed: int = 0, rounds: int = 1000) -> list[float]:
    """Bootstrap 95% interval of a tier's accuracy ([0, 0] when empty)."""
    if not values:
        return [0.0, 0.0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return [round(means[int(0.025 * rounds)], 4), round(means[int(0.975 * rounds) - 1], 4)]


def tier_report(scores: TierScores, seed: int = 0) -> dict[str, Any]:
    """{"M":…, "P":…, "C":…, "R":…, "n": {…}, "ci95": {…}} of one model on a probe set."""
    out: dict[str, Any] = {t: round(scores.accuracy(t), 4) for t in TIERS}
    out["n"] = {t: len(scores.correct.get(t, [])) for t in TIERS}
    out["ci95"] = {t: interval(scores.correct.get(t, []), seed) for t in TIERS}
    return out


@dataclass(frozen=True)
class Split:
    """Which documents an adapter trained on and which were its control (from its lineage),
    and the model its to-learn probes are relative to."""

    trained: set[str]
    control: set[str]
    parent: str


async def evaluate_documents(
    docs: Sequence[Document],
    adapter: str,
    split: Split,
    score: ScoreFn,
    limits: Limits = Limits(),
    to_learn: bool = True,
    per_document: int = 4,
    general_chars: int = 40_000,
    concurrency: int = 8,
) -> tuple[ProbeSet, dict[str, Any]]:
    """Knowledge probes of ``docs`` by tier for ``adapter``: the trained documents give M and P,
    the control ones C, the rest (with general text) R. With ``to_learn``, M/P/C keep only what
    ``split.parent`` gets wrong (as the gate does); without, every probe counts."""
    trained = [d for d in docs if d.id in split.trained]
    control = [d for d in docs if d.id in split.control]
    older = [d for d in docs if d.id not in split.trained and d.id not in split.control]
    learn, retention = probe_pools(
        trained + control,
        split.trained,
        older,
        general_chars,
        limits.seed,
        per_document,
    )
    if to_learn:
        probes = await build_probe_set(
            learn, retention, split.parent, score, replace(limits, dev_share=0.0), concurrency
        )
    else:
        probes = ProbeSet(
            tiers={
                **{
                    t: _cap(learn.get(t, []), limits.max_per_tier, limits.seed)
                    for t in ("M", "P", "C")
                },
                "R": _cap(retention, limits.max_per_tier, limits.seed),
            }
        )
    result = tier_report(await score_tiers(probes, adapter, score, concurrency), limits.seed)
    return probes, result
