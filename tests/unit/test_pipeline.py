import asyncio

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2
from services.ingest.chunking import Chunker
from services.ingest.pipeline import IngestPipeline, RawInput


class FakeRegistry:
    def __init__(self):
        self.docs = {}

    async def get_hashes(self, ids):
        return [self.docs.get(i, (None,))[0] for i in ids]

    async def record(self, docs):
        for doc_id, h, n, at in docs:
            self.docs[doc_id] = (h, n, at)

    async def get(self, doc_id):
        return self.docs.get(doc_id)

    async def delete(self, doc_id):
        return self.docs.pop(doc_id, None) is not None


def make(tokenizer):
    published = []

    async def publish(records):
        published.extend(records)

    pipeline = IngestPipeline(Chunker(tokenizer, 32, 4), FakeRegistry(), publish, "chunks", 1000)
    return pipeline, published


def run(coro):
    return asyncio.run(coro)


def events(published):
    out = []
    for _, _, value in published:
        e = events_pb2.KnowledgeEvent()
        e.ParseFromString(value)
        out.append(e)
    return out


def test_identical_content_is_a_no_op(tokenizer):
    pipeline, published = make(tokenizer)
    first = run(pipeline.ingest([RawInput("d1", "T", "Hello world. " * 20)]))
    n = len(published)
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
