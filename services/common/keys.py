"""Redis key names that more than one service reads (the contract between them)."""

from __future__ import annotations


def active_version_key(prefix: str, doc_id: str) -> str:
    """The content hash of a document's searchable version; written by retrieve's chunk store,
    read by ingest's dedup."""
    return f"{prefix}:active:{doc_id}"
