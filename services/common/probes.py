"""Knowledge probes from documents, without hand labels: closed-book cloze questions on the key
spans of a document's sentences (numbers with their units, domain terms), each with four
distractors of the same kind, scored by ranking the filled-in sentences by log-probability.

A probe is correct when the model gives the sentence with the true span a higher
log-probability than every sentence with a distractor. The prompt is the sentence up to the span
and each candidate is the span followed by the rest of the sentence, so ranking candidates is
ranking whole sentences (the prefix is common to all of them). Distractors come from the same
document where it has enough of the same kind (numbers of the same unit and format, other terms
of the document), else from the documents nearest to it: numbers of the same kind from *other*
documents are too easy (the sentence's own cues often give the true one away).

Which probes count is decided by scoring (services/common/knowledge.py): to-learn probes are
those the parent model gets wrong, retention probes those the base model gets right by a
margin. Everything here is plain data and deterministic for a seed, so a document version always
yields the same probes (they are cached by its content hash).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["number", "term"]
# Where a probe's sentence comes from: the document's own text (what an adapter trains on) or a
# restatement of it that training never sees (a conclusion, a question).
Origin = Literal["text", "restatement"]

DISTRACTORS = 4
MIN_PREFIX_WORDS = 3  # the prompt is the sentence before the span: too short says nothing
# The sentence after the span is kept up to the end of its clause, at most this many words: the
# words right after a span are what tells its candidates apart (a unit, "of the patients"), and
# every candidate row carries the suffix, so a whole long sentence would multiply the cost of
# scoring for little more signal.
MAX_SUFFIX_WORDS = 8
_CLAUSE_END = re.compile(r"[,;:()\[\]]|\.(?:\s|$)")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[\"'])")
_UNITS = (
    r"%|percent|mg/kg/day|mg/kg|mg/dl|mg/dL|mg/day|mmol/l|mmol/L|µg|mcg|ng/ml|ng/mL|"
    r"mm ?Hg|mg|kg/m2|kg|ml|mL|cm|mm|years?|yr|months?|weeks?|days?|hours?|h|min(?:utes)?|"
    r"patients|cases|subjects|children|women|men|participants|infants|eyes|procedures"
)
_NUMBER = re.compile(
    r"(?<![\w.,/-])(\d+(?:,\d{3})*(?:\.\d+)?)(?:\s?(" + _UNITS + r"))?(?![\w%])(?!\.\d)"
)
_WORD = re.compile(r"[A-Za-z][A-Za-z-]+")
_STOP = frozenset(
    """a an and are as at be been but by for from had has have in into is it its of on or
    than that the their there these this those to was were which with without not no we our
    after before between during among than more less most both each other such only also may
    study studies patients results methods conclusions conclusion background objective""".split()  # noqa: SIM905
)


@dataclass(frozen=True)
class Document:
    """What a document gives probes: its text (trained on), its domain terms (MeSH terms, tags)
    and texts that restate its facts but are never trained on (for PubMedQA: the conclusion and
    the question)."""

    id: str
    text: str
    terms: tuple[str, ...] = ()
    restatements: tuple[str, ...] = ()

    @property
    def version(self) -> str:
        body = json.dumps([self.id, self.text, self.terms, self.restatements])
        return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Probe:
    id: str
    doc_id: str
    kind: Kind
    origin: Origin
    prefix: str  # the sentence up to the span (the prompt)
    answer: str
    distractors: tuple[str, ...]
    suffix: str  # the rest of the sentence after the span
    # The span's kind key: the unit and format of a number, "term" for terms.
    key: str = ""
    # Whether the prefix ended with a space (the candidates start with one then).
    spaced: bool = True
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def candidates(self) -> list[str]:
        """The filled-in continuations, the true one first."""
        lead = " " if self.spaced else ""
        return [f"{lead}{span}{self.suffix}" for span in (self.answer, *self.distractors)]

    @property
    def sentence(self) -> str:
        return self.prefix + self.candidates[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Probe:
        return cls(**{**raw, "distractors": tuple(raw["distractors"])})


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    text: str
    kind: Kind
    key: str


def sentences(text: str) -> list[str]:
    """Sentences of a text (decimal points and abbreviations followed by lower case stay)."""
    out = []
    for part in _SENTENCE_END.split(text):
        part = part.strip()
        if part:
            out.append(part)
    return out


def _number_key(value: str, unit: str) -> str:
    unit = unit.strip().lower().replace(" ", "")
    if unit.endswith("s") and unit not in ("cases", "eyes"):
        unit = unit.rstrip("s") if unit not in ("mmhg",) else unit
    if unit == "percent":
        unit = "%"
    decimals = len(value.split(".")[1]) if "." in value else 0
    if not unit and decimals == 0 and len(value) == 4 and value[:2] in ("19", "20"):
        return "year"
    return f"{unit}|{decimals}"


def number_spans(sentence: str) -> list[Span]:
    spans = []
    for m in _NUMBER.finditer(sentence):
        value, unit = m.group(1), m.group(2) or ""
        spans.append(Span(m.start(), m.end(), m.group(0), "number", _number_key(value, unit)))
    return spans


def _term_pattern(term: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in re.split(r"[\s,]+", term.strip()) if w]
    return re.compile(r"(?<![\w-])" + r"[\s,]+".join(words) + r"(?![\w-])", re.IGNORECASE)


def term_spans(sentence: str, terms: Iterable[str]) -> list[Span]:
    spans = []
    for term in terms:
        if len(term) < 4:
            continue
        for m in _term_pattern(term).finditer(sentence):
            spans.append(Span(m.start(), m.end(), m.group(0), "term", "term"))
    # Longest first, then drop those inside another ("Stroke" inside "Stroke Volume").
    spans.sort(key=lambda s: (s.start, -(s.end - s.start)))
    kept: list[Span] = []
    for s in spans:
        if not any(k.start <= s.start and s.end <= k.end for k in kept):
            kept.append(s)
    return kept


def salient_terms(text: str, limit: int = 12) -> list[str]:
    """Domain terms of a document without metadata: content words and two-word phrases that
    recur in it (a crude stand-in for MeSH terms)."""
    words = [w.lower() for w in _WORD.findall(text)]
    counts: dict[str, int] = {}
    for i, w in enumerate(words):
        if w in _STOP or len(w) < 6:
            continue
        counts[w] = counts.get(w, 0) + 1
        if i + 1 < len(words) and words[i + 1] not in _STOP and len(words[i + 1]) >= 4:
            pair = f"{w} {words[i + 1]}"
            counts[pair] = counts.get(pair, 0) + 1
    recurring = [t for t, n in counts.items() if n >= 2]
    recurring.sort(key=lambda t: (-counts[t] * (1 + t.count(" ")), t))
    return recurring[:limit]


def document_terms(doc: Document) -> list[str]:
    found = [t for t in doc.terms if _term_pattern(t).search(doc.text)]
    return found if found else salient_terms(doc.text)


def _spans(sentence: str, terms: Sequence[str]) -> list[Span]:
    return number_spans(sentence) + term_spans(sentence, terms)


def _pool(doc: Document, terms: Sequence[str]) -> dict[str, list[str]]:
    """Every span of a document's text by kind key, in order of appearance, distinct."""
    pool: dict[str, list[str]] = {}
    for s in _spans(doc.text, terms):
        same = pool.setdefault(s.key, [])
        if s.text.lower() not in {x.lower() for x in same}:
            same.append(s.text)
    return pool


def _value(span: str) -> str:
    m = re.match(r"[\d.,]+", span)
    return (m.group(0).replace(",", "") if m else span).lower()


def _distractors(
    span: Span, own: dict[str, list[str]], near: Sequence[dict[str, list[str]]], rng: random.Random
) -> list[str] | None:
    """Four distractors of the span's kind: from its own document when it has enough, topped up
    from the nearest documents; None when there are not four."""
    taken = {_value(span.text)}
    chosen: list[str] = []
    for source in [own, *near]:
        options = [x for x in source.get(span.key, []) if _value(x) not in taken]
        rng.shuffle(options)
        for x in options:
            if len(chosen) == DISTRACTORS:
                break
            if _value(x) not in taken:
                taken.add(_value(x))
                chosen.append(x)
        if len(chosen) == DISTRACTORS:
            return chosen
    return None


def _probe_id(doc: Document, origin: str, sentence: str, span: Span) -> str:
    body = f"{doc.version}|{origin}|{sentence}|{span.start}|{span.text}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _probes_of_sentences(
    doc: Document,
    origin: Origin,
    texts: Sequence[str],
    terms: Sequence[str],
    own: dict[str, list[str]],
    near: Sequence[dict[str, list[str]]],
    rng: random.Random,
    require_in_text: bool,
) -> list[Probe]:
    out = []
    text_lower = doc.text.lower()
    for text in texts:
        for sentence in sentences(text):
            for span in _spans(sentence, terms):
                before = sentence[: span.start]
                if len(_WORD.findall(before)) < MIN_PREFIX_WORDS:
                    continue
                if require_in_text and span.text.lower() not in text_lower:
                    continue  # a restatement probe asks a fact the document states
                options = _distractors(span, own, near, rng)
                if options is None:
                    continue
                spaced = before.endswith(" ")
                suffix = clause_rest(sentence[span.end :])
                out.append(
                    Probe(
                        id=_probe_id(doc, origin, sentence, span),
                        doc_id=doc.id,
                        kind=span.kind,
                        origin=origin,
                        prefix=before.rstrip(" ") if spaced else before,
                        answer=span.text,
                        distractors=tuple(options),
                        suffix=suffix,
                        key=span.key,
                        spaced=spaced,
                    )
                )
    return out


def clause_rest(after: str) -> str:
    """What follows a span up to the end of its clause (or MAX_SUFFIX_WORDS words)."""
    for words, m in enumerate(re.finditer(r"\S+", after), start=1):
        cut = _CLAUSE_END.search(after, m.start(), m.end() + 1)
        if cut is not None and (words > 1 or cut.start() > m.start()):
            return after[: cut.start()]
        if words >= MAX_SUFFIX_WORDS:
            return after[: m.end()]
    return after.rstrip(".!? ")


def _words(doc: Document) -> set[str]:
    return {w.lower() for w in _WORD.findall(doc.text) if w.lower() not in _STOP}


def nearest(doc: Document, others: Sequence[Document], n: int = 5) -> list[Document]:
    """The documents most like ``doc`` by shared content words (Jaccard), ties by id."""
    mine = _words(doc)

    def similarity(other: Document) -> float:
        theirs = _words(other)
        return len(mine & theirs) / max(1, len(mine | theirs))

    ranked = sorted((o for o in others if o.id != doc.id), key=lambda o: (-similarity(o), o.id))
    return ranked[:n]


def probe_document(
    doc: Document,
    neighbours: Sequence[Document] = (),
    seed: int = 0,
    max_per_document: int = 4,
) -> list[Probe]:
    """The probes of one document: its own sentences (origin "text") and its restatements'
    sentences whose span the text also states (origin "restatement"). At most
    ``max_per_document`` of each origin, chosen by the seed, in sentence order."""
    terms = document_terms(doc)
    own = _pool(doc, terms)
    near = [_pool(n, document_terms(n)) for n in neighbours]
    rng = random.Random(f"{seed}:{doc.version}")
    out = []
    for origin, texts, must in (
        ("text", [doc.text], False),
        ("restatement", list(doc.restatements), True),
    ):
        found = _probes_of_sentences(doc, origin, texts, terms, own, near, rng, must)  # type: ignore[arg-type]
        if len(found) > max_per_document:
            keep = set(rng.sample(range(len(found)), max_per_document))
            found = [p for i, p in enumerate(found) if i in keep]
        out += found
    return out


def probe_documents(
    docs: Sequence[Document],
    context: Sequence[Document] = (),
    seed: int = 0,
    max_per_document: int = 4,
) -> list[Probe]:
    """Probes of every document; distractors missing from a document come from its nearest
    neighbours among ``docs`` and ``context``."""
    everyone = list(docs) + [c for c in context if c.id not in {d.id for d in docs}]
    out = []
    for doc in docs:
        out += probe_document(doc, nearest(doc, everyone), seed, max_per_document)
    return out


def pubmedqa_document(key: str, item: dict[str, Any]) -> Document:
    """A PubMedQA item as a document: the abstract is the text, the MeSH terms the terms, the
    conclusion (LONG_ANSWER) and the question the restatements."""
    restated = tuple(t for t in (item.get("LONG_ANSWER", ""), item.get("QUESTION", "")) if t)
    return Document(
        id=str(key),
        text=" ".join(str(c) for c in item.get("CONTEXTS", [])),
        terms=tuple(str(t) for t in item.get("MESHES", [])),
        restatements=restated,
    )


def load_documents(path_text: str, raw: bytes) -> list[Document]:
    """Documents of a PubMedQA JSON file ({id: item}) or of JSONL ({"id", "text", "metadata":
    {"terms"|"tags"|"mesh": [...]}, "restatements": [...]} a line). ValueError naming the
    problem."""
    text = raw.decode("utf-8")
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n{" not in stripped.strip():
        data = json.loads(text)
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            if all("CONTEXTS" in v for v in data.values()):
                return [pubmedqa_document(k, v) for k, v in data.items()]
            data = [data]
        rows = data if isinstance(data, list) else [data]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path_text}:{n}: not JSON: {exc}") from exc
    docs = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not str(row.get("text", "")).strip():
            raise ValueError(f"{path_text}: document {n} has no text")
        meta = row.get("metadata") or {}
        terms = meta.get("terms") or meta.get("mesh") or meta.get("tags") or []
        docs.append(
            Document(
                id=str(row.get("id") or n),
                text=str(row["text"]),
                terms=tuple(str(t) for t in terms),
                restatements=tuple(str(t) for t in row.get("restatements", [])),
            )
        )
    return docs
