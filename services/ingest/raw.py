"""Parsing of records on the raw-documents topic, written by plain Kafka producers.

A record is JSON (``{"id", "title", "text", "metadata": {"source", "domain", "tags",
"attributes", "access_groups"}}``; ``source``/``domain``/``tags``/``access_groups`` may also sit
at the top level; ``access_groups`` is a list of names or one comma-separated string) or a
serialized ``knowstream.events.v1.RawDocument``. A ``content-type`` header decides when present;
otherwise a value starting with ``{`` is JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError

from knowstream.events.v1 import events_pb2
from services.common.kafka import BadEvent, check_header
from services.ingest.pipeline import RawInput

JSON_TYPES = {"application/json", "json"}
PROTO_TYPES = {"application/x-protobuf", "application/protobuf", "protobuf"}


def _header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str:
    for key, value in headers or ():
        if key.lower() == name:
            return value.decode("latin-1").strip().lower()
    return ""


def parse_raw_record(
    value: bytes | None, headers: Sequence[tuple[str, bytes]] | None = None
) -> RawInput:
    if not value:
        raise BadEvent("empty record value")
    content_type = _header(headers, "content-type")
    if content_type in JSON_TYPES or (not content_type and value.lstrip()[:1] == b"{"):
        return _from_json(value)
    if content_type and content_type not in PROTO_TYPES:
        raise BadEvent(f"unsupported content-type {content_type!r}")
    doc = events_pb2.RawDocument()
    try:
        doc.ParseFromString(value)
    except DecodeError as exc:
        raise BadEvent(f"neither JSON nor a RawDocument protobuf: {exc}") from exc
    if doc.HasField("header"):
        check_header(doc.header, "RawDocument")
    if not doc.id and not doc.text:
        raise BadEvent("not a RawDocument: no id and no text")
    return RawInput.from_proto(doc)


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise BadEvent(f"field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _from_json(value: bytes) -> RawInput:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadEvent(f"record is not valid UTF-8 (byte {exc.start})") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadEvent(f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadEvent(f"JSON record must be an object, got {type(obj).__name__}")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise BadEvent("field 'metadata' must be an object")
    merged = {
        **{k: obj[k] for k in ("source", "domain", "tags", "access_groups") if k in obj},
        **meta,
    }
    tags = merged.get("tags") or []
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadEvent("field 'tags' must be a list of strings")
    groups = merged.get("access_groups") or []
    if isinstance(groups, str):
        groups = groups.split(",")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BadEvent("field 'access_groups' must be a list of strings or one string")
    attributes = merged.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise BadEvent("field 'attributes' must be an object")
    if "text" not in obj:
        raise BadEvent("field 'text' is required")
    return RawInput(
        id=_str(obj, "id"),
        title=_str(obj, "title"),
        text=_str(obj, "text"),
        source=_str(merged, "source"),
        domain=_str(merged, "domain"),
        tags=tuple(tags),
        attributes={str(k): str(v) for k, v in attributes.items()},
        access_groups=tuple(groups),
    )
