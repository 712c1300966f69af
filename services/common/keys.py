"""Names more than one service relies on (the contract between them): Redis keys, and the
caller id of evaluation traffic."""

from __future__ import annotations


def active_version_key(prefix: str, doc_id: str) -> str:
    """The content hash of a document's searchable version; written by retrieve's chunk store,
    read by ingest's dedup."""
    return f"{prefix}:active:{doc_id}"


def adapter_questions_key(prefix: str, adapter_id: str) -> str:
    """Training questions of an adapter (a list); written by the trainer, read by the monitor
    when the reference is "the live adapter's training data"."""
    return f"{prefix}:adapter:{adapter_id}:questions"


def request_key(prefix: str, request_id: str) -> str:
    """The question of an answered request (expires); written by infer, read by infer when
    feedback on the request arrives."""
    return f"{prefix}:request:{request_id}"


# Callers named so are evaluation runs, not users: the drift monitor leaves their questions out.
EVAL_CALLER = "knowstream-eval"
