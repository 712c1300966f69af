"""Knowledge augmentation for continued pretraining: each fact of a new document is trained on in
more than one form, because one verbatim copy is memorised but not learned as knowledge.

Allen-Zhu & Li (Physics of Language Models 3.1) found a fact extractable only when training
states it in varied forms (sentence shuffles and rewrites took a 124M model from 9.7% to
96.6%); Ovadia et al. (EMNLP 2024) saw accuracy rise with the number of paraphrased copies.
Without a generator model on a 2-core machine the forms here are rule-based: sentence-shuffled
copies, restatements of the key sentences (those with a number or domain-term span, what the
probes of services/common/probes.py ask) and question-answer pairs on them.

Every form keeps each key span inside its own clause verbatim (only a clause's first letter may
change case, never a span's): probes ask for the span in the original sentence's wording, so
the words next to it must be the ones trained on. The answers of QA pairs are the full original
sentences, the form probes score. ``doc.restatements`` (conclusions, questions) is never read:
Tier-P probes are built from it and must stay unseen by training. Lengths are capped relative
to the raw text so that augmentation multiplies training cost by a known bound.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.probes import (
    MIN_PREFIX_WORDS,
    Document,
    Span,
    document_terms,
    number_spans,
    sentences,
    term_spans,
)

RESTATEMENT_BUDGET = 1.5  # restatement chars per raw char, at most
QA_BUDGET = 2.0  # QA chars per raw char, at most
# Chars allowed above either budget, so that a document of one short key sentence still gets
# its restatement and QA pair (a pair alone is twice the sentence and then some).
BUDGET_SLACK = 64
MIN_CLAUSE_WORDS = 4  # a shorter side of a comma is no clause worth moving
MIN_QUOTED_WORDS = 6  # a shorter clause says too little alone ("in regression analyses")
_ENUMERATE = 5  # up to this many sentences every permutation is listed (120), above sampled
_TRIES = 20  # draws per wanted copy (above 5 sentences a repeat of 720+ orders is rare)

# Units a count is asked of with "how many" (as probes' _number_key spells them).
_COUNT_UNITS = frozenset(
    "year month week day hour h min minute patient cases subject children women men "  # noqa: SIM905
    "participant infant eyes procedure".split()
)
_UNIT_WORDS = {"h": "hours", "min": "minutes"}
# Openings of an introductory clause, the one kind of "A, B." that reads as well as "B, A."
# (a comma in a list "X, Y and Z" must not be turned around).
_INTRODUCTORY = frozenset(
    "although though while whereas when whenever after before because since despite unlike "  # noqa: SIM905
    "compared among in during for from over under with without using following given "
    "if unless once as".split()
)
_WORD = re.compile(r"\S+")
_NUMERAL = re.compile(r"^[\d.,]+\s?")


@dataclass(frozen=True)
class Augmentation:
    shuffles: int = 2  # sentence-shuffled copies of the text per document
    restatements: bool = True  # rule-based restatements of key sentences
    qa_pairs: bool = True  # question-answer pairs synthesised from key sentences
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shuffles < 0:
            raise ValueError(f"shuffles must be >= 0, got {self.shuffles}")


@dataclass(frozen=True)
class Form:
    kind: str  # "raw" | "shuffle" | "restatement" | "qa"
    text: str


def _rng(doc: Document, aug: Augmentation, part: str) -> random.Random:
    # One stream per part, so turning one part off leaves the others unchanged; seeded by the
    # text alone, so that nothing of doc.restatements reaches even the random choices.
    digest = hashlib.sha256(doc.text.encode()).hexdigest()
    return random.Random(f"{aug.seed}:{part}:{digest}")


def _shuffles(parts: list[str], n: int, rng: random.Random) -> list[str]:
    """Up to n distinct non-identity orders; fewer when there are fewer (a repeated order is
    only another pass over one form, which the trainer's passes already give)."""
    if len(parts) < 2 or n == 0:
        return []
    if len(parts) <= _ENUMERATE:
        orders = list(itertools.permutations(range(len(parts))))[1:]
        chosen = rng.sample(orders, min(n, len(orders)))
    else:
        seen, chosen = {tuple(range(len(parts)))}, []
        order = list(range(len(parts)))
        for _ in range(n * _TRIES):
            rng.shuffle(order)
            if tuple(order) not in seen:
                seen.add(tuple(order))
                chosen.append(tuple(order))
                if len(chosen) == n:
                    break
    return [" ".join(parts[i] for i in order) for order in chosen]


def _at_span(pos: int, spans: Sequence[Span]) -> bool:
    return any(s.start <= pos < s.end for s in spans)


def _clauses(sentence: str, spans: Sequence[Span]) -> list[tuple[int, int]]:
    """(start, end) of the clauses between ", ", "; " and ". " (sentences joined by a digit
    stay one sentence in probes), never cutting a span or a parenthesis ("1,000", "(n=12, 4%)")."""
    covered = bytearray(len(sentence) + 1)  # a mask, not a span scan per character
    for span in spans:
        covered[span.start : span.end] = b"\x01" * (span.end - span.start)
    starts, depth = [0], 0
    for i, ch in enumerate(sentence):
        depth += (ch in "([") - (ch in ")]")
        if ch in ",;." and depth <= 0 and sentence[i + 1 : i + 2] == " " and not covered[i]:
            starts.append(i + 2)
    ends = [s - 2 for s in starts[1:]] + [len(sentence)]
    return list(zip(starts, ends, strict=True))


def _clause_of(pos: int, clauses: list[tuple[int, int]]) -> tuple[int, int]:
    return next(c for c in clauses if pos < c[1] + 2)


def _lower_first(text: str, protected: bool) -> str:
    """The first letter lowered where it only marks a sentence start: never in a span, an
    acronym or a word with inner capitals."""
    word = text.split(" ", 1)[0]
    if protected or not word[:1].isupper() or any(c.isupper() for c in word[1:]):
        return text
    return text[0].lower() + text[1:]


def _words(text: str) -> int:
    return len(_WORD.findall(text))


def _reordered(sentence: str, spans: Sequence[Span], clauses: list[tuple[int, int]]) -> str | None:
    """ "A, B." as "B, A." when A is an introductory clause and both are long enough."""
    if not sentence.endswith(".") or len(clauses) < 2 or sentence[clauses[0][1]] != ",":
        return None
    back, front = sentence[: clauses[0][1]], sentence[clauses[1][0] : -1]
    if _words(front) < MIN_CLAUSE_WORDS or _words(back) < MIN_CLAUSE_WORDS:
        return None
    if back.split(" ", 1)[0].lower() not in _INTRODUCTORY:
        return None
    if front[0].islower() and _at_span(clauses[1][0], spans):
        return None  # capitalising it would change a span
    return f"{front[0].upper()}{front[1:]}, {_lower_first(back, _at_span(0, spans))}."


def _restatements(sentence: str, spans: Sequence[Span]) -> list[str]:
    """The templates that fit the sentence, all keeping every span with its clause."""
    clauses = _clauses(sentence, spans)
    out = [
        f"Key finding: {sentence}",
        f"The study reported that {_lower_first(sentence, _at_span(0, spans))}",
    ]
    if len(clauses) > 1:
        a, b = _clause_of(spans[0].start, clauses)
        clause = sentence[a:b].rstrip(".!?")
        if _words(clause) >= MIN_QUOTED_WORDS:
            out.append(f"{sentence} In other words, {_lower_first(clause, _at_span(a, spans))}.")
    reordered = _reordered(sentence, spans, clauses)
    if reordered:
        out.append(reordered)
    return out


def _wh(span: Span) -> str:
    if span.kind == "term":
        return "what"
    if span.key == "year":
        return "what year"
    unit, decimals = span.key.split("|")
    if unit == "%":
        return "what percentage"
    if unit in _COUNT_UNITS:
        word = _NUMERAL.sub("", span.text)
        return f"how many {_UNIT_WORDS.get(word, word)}"
    return "how many" if not unit and decimals == "0" else "what value"


def _qa(sentence: str, spans: Sequence[Span], rng: random.Random) -> str:
    # Asked: a span probes would ask (about enough words before it), standing alone ("318.4" of
    # "107.4±318.4" is half a value).
    word_starts = [m.start() for m in _WORD.finditer(sentence)]
    asked = [
        s
        for s in spans
        if bisect.bisect_left(word_starts, s.start) >= MIN_PREFIX_WORDS
        and sentence[s.start - 1] == " "
    ]
    span = rng.choice(asked or list(spans))
    # The question is the span's clause (shorter than the sentence, which the answer holds).
    a, b = _clause_of(span.start, _clauses(sentence, spans))
    if _words(sentence[a:b]) < MIN_QUOTED_WORDS:
        a, b = 0, len(sentence)
    prefix = _lower_first(sentence[a : span.start], _at_span(a, spans))
    suffix = sentence[span.end : b].rstrip(" .!?;,:")
    return f"Question: In this study, {prefix}{_wh(span)}{suffix}?\nAnswer: {sentence}"


def _joined(texts: list[tuple[str, str]], sep: str, budget: float) -> str:
    """The preferred text of each pair, else its cheaper one, joined while the total fits: a
    sentence that fits no more is left to the raw text and the shuffles."""
    out: list[str] = []
    used = -len(sep)
    for preferred, cheap in texts:
        for text in (preferred, cheap):
            if used + len(sep) + len(text) <= budget:
                out.append(text)
                used += len(sep) + len(text)
                break
    return sep.join(out)


def augment(doc: Document, aug: Augmentation) -> list[Form]:
    """The raw text first, then the augmented forms."""
    forms = [Form("raw", doc.text)]
    parts = sentences(doc.text)
    forms += [Form("shuffle", t) for t in _shuffles(parts, aug.shuffles, _rng(doc, aug, "shuf"))]
    terms = document_terms(doc)
    keyed = [(s, sp) for s in parts if (sp := number_spans(s) + term_spans(s, terms))]
    if aug.restatements and keyed:
        rng = _rng(doc, aug, "restate")
        options = []
        for sentence, spans in keyed:
            fitting = _restatements(sentence, spans)
            options.append((rng.choice(fitting), min(fitting, key=len)))
        text = _joined(options, " ", RESTATEMENT_BUDGET * len(doc.text) + BUDGET_SLACK)
        if text:
            forms.append(Form("restatement", text))
    if aug.qa_pairs and keyed:
        rng = _rng(doc, aug, "qa")
        pairs = [_qa(s, sp, rng) for s, sp in keyed]
        text = _joined([(p, p) for p in pairs], "\n\n", QA_BUDGET * len(doc.text) + BUDGET_SLACK)
        if text:
            forms.append(Form("qa", text))
    return forms
