import asyncio

import pytest

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2
from services.ingest.chunking import Chunker
from services.ingest.pipeline import IngestPipeline, RawInput
from tests.unit.ingest.fakes import FakeLog, FakeRegistry


def make_with(tokenizer):
    log = FakeLog()
    registry = FakeRegistry()
    pipeline = IngestPipeline(Chunker(tokenizer, 32, 4), registry, log.publish, "chunks", 1000)
    return pipeline, registry, log


def make(tokenizer):
    pipeline, _, log = make_with(tokenizer)
    return pipeline, log.records


def run(coro):
    return asyncio.run(coro)


def events(published):
    out = []
    for _, _, value in published:
        e = events_pb2.KnowledgeEvent()
        e.ParseFromString(value)
        out.append(e)
    return out


def test_identical_content_is_a_no_op_once_indexed(tokenizer):
    pipeline, registry, log = make_with(tokenizer)
    published = log.records
    first = run(pipeline.ingest([RawInput("d1", "T", "Hello world. " * 20)]))
    n = len(published)
    registry.active["d1"] = first[0].content_hash  # retrieve activated it
    again = run(pipeline.ingest([RawInput("d1", "T", "Hello   world. " * 20)]))
    assert first[0].status == ingest_pb2.INGEST_STATUS_ACCEPTED
    assert first[0].chunk_count == n > 1
    assert again[0].status == ingest_pb2.INGEST_STATUS_UNCHANGED
    assert len(published) == n


def test_changed_content_publishes_a_new_version_with_new_chunk_ids(tokenizer):
    pipeline, published = make(tokenizer)
    run(pipeline.ingest([RawInput("d1", "", "Version one of the text.")]))
    run(pipeline.ingest([RawInput("d1", "", "Version two of the text.")]))
    chunks = [e.chunk for e in events(published)]
    assert len({c.content_hash for c in chunks}) == 2
    assert len({c.chunk_id for c in chunks}) == 2
    assert all(c.chunk_id.startswith("d1#") for c in chunks)


def test_invalid_documents_do_not_block_the_valid_ones(tokenizer):
    pipeline, published = make(tokenizer)
    results = run(
        pipeline.ingest(
            [
                RawInput("ok1", "", "Fine text."),
                RawInput("bad", "", "  "),
                RawInput("big", "", "x" * 2000),
                RawInput("ok2", "", "Also fine."),
            ]
        )
    )
    statuses = [r.status for r in results]
    assert statuses == [
        ingest_pb2.INGEST_STATUS_ACCEPTED,
        ingest_pb2.INGEST_STATUS_REJECTED,
        ingest_pb2.INGEST_STATUS_REJECTED,
        ingest_pb2.INGEST_STATUS_ACCEPTED,
    ]
    assert "empty" in results[1].error and "limit" in results[2].error
    assert {e.chunk.doc_id for e in events(published)} == {"ok1", "ok2"}


def test_delete_publishes_a_deletion_keyed_by_document(tokenizer):
    pipeline, published = make(tokenizer)
    assert run(pipeline.delete("missing")) is False
    run(pipeline.ingest([RawInput("d1", "", "Text.")]))
    assert run(pipeline.delete("d1")) is True
    topic, key, _ = published[-1]
    assert (topic, key) == ("chunks", b"d1")
    assert events(published)[-1].deleted.doc_id == "d1"


def test_accepted_but_not_indexed_is_published_again_not_unchanged(tokenizer):
    pipeline, _, log = make_with(tokenizer)
    first = run(pipeline.ingest([RawInput("d1", "T", "Hello world. " * 20)]))
    n = len(log.records)
    again = run(pipeline.ingest([RawInput("d1", "T", "Hello world. " * 20)]))
    assert again[0].status == ingest_pb2.INGEST_STATUS_ACCEPTED
    assert len(log.records) == 2 * n
    assert {e.chunk.chunk_id for e in events(log.records)} == {
        e.chunk.chunk_id for e in events(log.records[:n])
    }
    assert again[0].content_hash == first[0].content_hash


def test_a_version_is_in_the_outbox_before_its_records_are_published(tokenizer):
    registry = FakeRegistry()
    seen = []

    async def publish(records):
        seen.append({i: registry.docs[i]["content_hash"] for i in registry.due_at})
        return await FakeLog().publish(records)

    pipeline = IngestPipeline(Chunker(tokenizer, 32, 4), registry, publish, "chunks", 1000)
    result = run(pipeline.ingest([RawInput("d1", "", "Some text.")]))
    assert seen == [{"d1": result[0].content_hash}]
    state = run(registry.pending(["d1"]))[0]
    assert state.position is not None and state.attempts == 1 and state.body


def test_a_failed_publish_leaves_the_version_in_the_outbox(tokenizer):
    registry = FakeRegistry()

    async def publish(records):
        raise ConnectionError("broker down")

    pipeline = IngestPipeline(Chunker(tokenizer, 32, 4), registry, publish, "chunks", 1000)
    with pytest.raises(ConnectionError):
        run(pipeline.ingest([RawInput("d1", "", "Some text.")]))
    assert "d1" in registry.due_at and registry.docs["d1"]["content_hash"]


def test_delete_keeps_a_tombstone_until_applied(tokenizer):
    pipeline, registry, log = make_with(tokenizer)
    run(pipeline.ingest([RawInput("d1", "", "Text.")]))
    assert run(pipeline.delete("d1")) is True
    assert run(registry.get("d1")) is None  # deleted for readers at once
    (state,) = run(registry.pending(["d1"]))
    assert state.deletion and state.settled  # nothing of it was indexed: applied
    registry.active["d1"] = "x"
    (state,) = run(registry.pending(["d1"]))
    assert state.deletion and not state.settled
    assert run(pipeline.republish("d1")) is True
    assert events(log.records)[-1].deleted.doc_id == "d1"


def test_republish_sends_the_same_chunks_and_never_an_older_version(tokenizer):
    pipeline, registry, log = make_with(tokenizer)
    run(pipeline.ingest([RawInput("d1", "T", "Version one. " * 10)]))
    n = len(log.records)
    assert run(pipeline.republish("d1")) is True
    assert [e.chunk.chunk_id for e in events(log.records[n:])] == [
        e.chunk.chunk_id for e in events(log.records[:n])
    ]
    assert run(registry.pending(["d1"]))[0].attempts == 2
    second = run(pipeline.ingest([RawInput("d1", "T", "Version two. " * 10)]))
    before = len(log.records)
    assert run(pipeline.republish("d1")) is True  # publishes the current version, two
    assert {e.chunk.content_hash for e in events(log.records[before:])} == {second[0].content_hash}
    registry.active["d1"] = second[0].content_hash
    assert run(pipeline.republish("d1")) is False  # applied: nothing to do
