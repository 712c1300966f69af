"""Validation, normalisation and content hashing of incoming documents (no I/O)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field

from services.common.access import InvalidGroups, parse_groups
from services.common.errors import InvalidArgument
from services.common.limits import LimitExceeded, LimitSettings

MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 1_000
ACCESS_GROUPS_ATTRIBUTE = "access_groups"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


class InvalidDocument(InvalidArgument):
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
    # Who may read it (services/common/access.py); () = public.
    access_groups: tuple[str, ...] = ()

    @property
    def content_hash(self) -> str:
        """Identifies a version: same title, text and metadata give the same hash."""
        fields: list[object] = [
            self.title,
            self.text,
            self.source,
            self.domain,
            sorted(self.tags),
            sorted(self.attributes.items()),
        ]
        if self.access_groups:
            # Only when set, so public documents keep the hashes they had before groups existed;
            # a change of groups is a new version (its chunks are indexed with the new groups).
            fields.append(sorted(self.access_groups))
        payload = json.dumps(fields, ensure_ascii=False)
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


def check_metadata(
    limits: LimitSettings,
    source: str,
    domain: str,
    tags: tuple[str, ...],
    attributes: dict[str, str],
) -> None:
    """LimitExceeded for metadata over its caps (it is stored and returned with the document)."""
    limits.check_text("metadata.source", source, "limit_label_chars")
    limits.check_text("metadata.domain", domain, "limit_label_chars")
    limits.check_list("metadata.tags", tags, "limit_tags", "limit_tag_chars")
    # The access-groups attribute is parsed (and capped) as groups, not counted here.
    plain = {k: v for k, v in attributes.items() if k != ACCESS_GROUPS_ATTRIBUTE}
    limits.check_list("metadata.attributes", list(plain), "limit_attributes")
    for key, value in plain.items():
        limits.check_text("metadata.attributes key", key, "limit_attribute_key_chars")
        limits.check_text(f"metadata.attributes[{key[:40]!r}]", value, "limit_attribute_chars")


def clean_document(
    doc_id: str | bytes,
    title: str | bytes,
    text: str | bytes,
    *,
    source: str = "",
    domain: str = "",
    tags: list[str] | tuple[str, ...] = (),
    attributes: dict[str, str] | None = None,
    access_groups: list[str] | tuple[str, ...] = (),
    max_bytes: int,
    limits: LimitSettings | None = None,
) -> CleanDocument:
    """Validates and normalises one document or raises :class:`InvalidDocument`.

    Access groups may also come as a comma-separated ``access_groups`` attribute (for producers
    that can only set attributes): it is moved into the groups, never left as a plain
    attribute that looks like a restriction and is none. Metadata is capped by ``limits``
    (KS_LIMIT_* settings when None)."""
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
    clean_attributes = {str(k): str(v) for k, v in (attributes or {}).items()}
    try:
        check_metadata(limits or LimitSettings(), source, domain, clean_tags, clean_attributes)
    except LimitExceeded as exc:
        raise InvalidDocument(f"document {doc_id!r}: {exc}") from None
    try:
        from_attribute = clean_attributes.pop(ACCESS_GROUPS_ATTRIBUTE, "").split(",")
        groups = parse_groups([*access_groups, *from_attribute])
    except InvalidGroups as exc:
        raise InvalidDocument(f"document {doc_id!r}: {exc}") from None
    return CleanDocument(
        id=doc_id,
        title=title,
        text=text,
        source=normalize_text(source),
        domain=normalize_text(domain).lower(),
        tags=clean_tags,
        attributes=clean_attributes,
        access_groups=tuple(sorted(groups)),
    )
