"""Validation, normalisation and content hashing of incoming documents (no I/O)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field

MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 1_000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


class InvalidDocument(ValueError):
    """The message names the document and what is wrong with it."""


@dataclass(frozen=True)
class CleanDocument:
    id: str
    title: str
    text: str
    source: str = ""
    domain: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """Identifies a version: same title, text and metadata give the same hash."""
        payload = json.dumps(
            [
                self.title,
                self.text,
                self.source,
                self.domain,
                sorted(self.tags),
                sorted(self.attributes.items()),
            ],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def normalize_text(text: str) -> str:
    """NFC, no control characters, single spaces, at most one blank line between paragraphs."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _check_utf8(value: str | bytes, what: str, doc_id: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidDocument(
                f"document {doc_id!r}: {what} is not valid UTF-8 (byte {exc.start})"
            ) from exc
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from a lenient decoder
        raise InvalidDocument(
            f"document {doc_id!r}: {what} is not valid UTF-8 (character {exc.start})"
        ) from exc
    return value


def clean_document(
    doc_id: str | bytes,
    title: str | bytes,
    text: str | bytes,
    *,
    source: str = "",
    domain: str = "",
    tags: list[str] | tuple[str, ...] = (),
    attributes: dict[str, str] | None = None,
    max_bytes: int,
) -> CleanDocument:
    """Validates and normalises one document or raises :class:`InvalidDocument`."""
    doc_id = _check_utf8(doc_id, "id", "?").strip()
    if not doc_id:
        raise InvalidDocument("document id is required")
    if len(doc_id) > MAX_ID_CHARS or _CONTROL.search(doc_id) or "\n" in doc_id:
        raise InvalidDocument(
            f"document id {doc_id[:40]!r}: must be 1-{MAX_ID_CHARS} printable characters"
        )
    raw_size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "replace"))
    if raw_size > max_bytes:
        raise InvalidDocument(
            f"document {doc_id!r}: text is {raw_size} bytes; the limit is {max_bytes} bytes"
        )
    text = normalize_text(_check_utf8(text, "text", doc_id))
    if not text:
        raise InvalidDocument(f"document {doc_id!r}: text is empty")
    title = normalize_text(_check_utf8(title, "title", doc_id)).replace("\n", " ")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidDocument(
            f"document {doc_id!r}: title is {len(title)} characters; the limit is {MAX_TITLE_CHARS}"
        )
    clean_tags = tuple(sorted({normalize_text(t) for t in tags if normalize_text(t)}))
    return CleanDocument(
        id=doc_id,
        title=title,
        text=text,
        source=normalize_text(source),
        domain=normalize_text(domain).lower(),
        tags=clean_tags,
        attributes={str(k): str(v) for k, v in (attributes or {}).items()},
    )
