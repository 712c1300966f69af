"""Names more than one service relies on (the contract between them): Redis keys, and the
caller id of evaluation traffic."""

from __future__ import annotations


def active_version_key(prefix: str, doc_id: str) -> str:
    """The content hash of a document's searchable version; written by retrieve's chunk store,
    read by ingest (services/common/indexed.py)."""
    return f"{prefix}:active:{doc_id}"


def stored_versions_key(prefix: str, doc_id: str) -> str:
    """The versions of a document retrieve's chunk store holds chunks of (a set; complete or
    not); written by retrieve, read by ingest to tell when a deletion has been applied."""
    return f"{prefix}:vers:{doc_id}"


# Callers named so are evaluation runs, not users: the drift monitor leaves their questions out.
EVAL_CALLER = "knowstream-eval"


def stream_status_key(prefix: str, address: str) -> str:
    """Health detail of a service's streams (a hash: stream name -> JSON {ok, reason, lag};
    expires): written by the consumer plumbing, read by `knowstream status`. The gRPC health
    protocol has a status and no reason; this is where the reason is."""
    return f"{prefix}:health:{address}"


def log_resets_key(prefix: str) -> str:
    """When a consumer last found a topic's log reset (a hash: topic -> epoch ms): written by
    the consumer plumbing, read by ingest's reconciler, which then re-publishes at once."""
    return f"{prefix}:log:resets"


def stream_fingerprints_key(prefix: str, group: str) -> str:
    """The last record a consumer group processed per partition (a hash: "topic:partition" ->
    "offset:timestamp"), so a restarted consumer can tell a reset log from its own position."""
    return f"{prefix}:streams:{group}:fingerprints"
