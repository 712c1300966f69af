"""`knowstream ingest`'s wait until what it sent is searchable (services/cli/indexing.py), over a
fake GetIndexing."""

from __future__ import annotations

from knowstream.ingest.v1 import ingest_pb2
from services.cli.indexing import BATCH, to_wait_for, wait_searchable


class FakeIndex:
    """Accepted and searchable versions by id; ``steps`` makes documents searchable one poll
    at a time."""

    def __init__(self, accepted: dict[str, str], steps: list[list[str]]):
        self.accepted = dict(accepted)
        self.searchable: dict[str, str] = {}
        self.steps = steps
        self.calls: list[list[str]] = []

    def lookup(self, ids: list[str]):
        self.calls.append(ids)
        return [(i, self.accepted.get(i, ""), self.searchable.get(i, "")) for i in ids]

    def sleep(self, _s: float) -> None:
        for doc_id in self.steps.pop(0) if self.steps else []:
            self.searchable[doc_id] = self.accepted[doc_id]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_waits_for_the_accepted_versions_with_progress():
    index = FakeIndex({"a": "h1", "b": "h2", "c": "h3"}, [["a"], [], ["b", "c"]])
    progress: list[int] = []
    left = wait_searchable(
        {"a": "h1", "b": "h2", "c": "h3"},
        index.lookup,
        progress.append,
        60,
        0,
        Clock(),
        index.sleep,
    )
    assert left == {} and progress == [1, 2]
    # Only what is still pending is asked for again.
    assert index.calls[-1] == ["b", "c"]


def test_a_version_replaced_or_deleted_since_is_not_waited_for():
    index = FakeIndex({"a": "newer", "b": ""}, [])
    left = wait_searchable({"a": "h1", "b": "h2"}, index.lookup, lambda n: None, 60, 0)
    assert left == {}


def test_gives_up_at_the_deadline_and_names_what_is_left():
    index = FakeIndex({"a": "h1", "b": "h2"}, [["a"]])
    clock = Clock()
    left = wait_searchable(
        {"a": "h1", "b": "h2"}, index.lookup, lambda n: None, 5, 0, clock, index.sleep
    )
    assert left == {"b": "h2"} and clock.t >= 5


def test_asks_in_batches():
    ids = {f"d{i}": "h" for i in range(BATCH + 3)}
    index = FakeIndex(ids, [])
    index.searchable = dict(ids)
    assert wait_searchable(dict(ids), index.lookup, lambda n: None, 60, 0) == {}
    assert [len(c) for c in index.calls] == [BATCH, 3]


def test_only_accepted_documents_are_waited_for():
    results = [
        ingest_pb2.DocumentResult(
            id="a", status=ingest_pb2.INGEST_STATUS_ACCEPTED, content_hash="1"
        ),
        ingest_pb2.DocumentResult(
            id="b", status=ingest_pb2.INGEST_STATUS_UNCHANGED, content_hash="2"
        ),
        ingest_pb2.DocumentResult(id="c", status=ingest_pb2.INGEST_STATUS_REJECTED, error="x"),
    ]
    assert to_wait_for(results) == {"a": "1"}


def test_help_is_plain_text(capsys):
    import pytest

    from services.cli.main import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "knowstream" in out and "--traceparent" in out
