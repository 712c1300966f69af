"""``knowstream ingest`` waits until what it sent is searchable: the versions ingest accepted are
looked up with ``GetIndexing`` until retrieve serves each of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from knowstream.ingest.v1 import ingest_pb2

# ids per GetIndexing call (the service's limit is 1000)
BATCH = 500

# (id, accepted version, searchable version) for the ids asked about
Lookup = Callable[[list[str]], Iterable[tuple[str, str, str]]]


def to_wait_for(results: Sequence[ingest_pb2.DocumentResult]) -> dict[str, str]:
    """The versions to wait for: the accepted ones (an unchanged document is searchable
    already: ingest answers "unchanged" only for a version retrieve serves)."""
    return {r.id: r.content_hash for r in results if r.status == ingest_pb2.INGEST_STATUS_ACCEPTED}


def wait_searchable(
    pending: dict[str, str],
    lookup: Lookup,
    on_done: Callable[[int], object],
    timeout_s: float,
    interval_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> dict[str, str]:
    """Polls until every version in ``pending`` (id -> content hash) is searchable, or has been
    replaced or deleted since (nothing to wait for any more); ``on_done(n)`` reports progress.
    Returns what is still not searchable when ``timeout_s`` has passed."""
    left = dict(pending)
    deadline = clock() + timeout_s
    while left:
        ids = list(left)
        done = 0
        for start in range(0, len(ids), BATCH):
            for doc_id, accepted, searchable in lookup(ids[start : start + BATCH]):
                want = left.get(doc_id)
                if want is not None and (searchable == want or accepted != want):
                    del left[doc_id]
                    done += 1
        if done:
            on_done(done)
        if not left or clock() >= deadline:
            break
        sleep(interval_s)
    return left


def grpc_lookup(stub: object, timeout_s: float) -> Lookup:
    """:data:`Lookup` over an IngestService stub."""

    def lookup(ids: list[str]) -> Iterable[tuple[str, str, str]]:
        reply = stub.GetIndexing(  # type: ignore[attr-defined]
            ingest_pb2.GetIndexingRequest(ids=ids), timeout=timeout_s
        )
        return [(d.id, d.accepted_hash, d.searchable_hash) for d in reply.documents]

    return lookup
