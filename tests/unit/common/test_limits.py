"""Caps on unbounded request fields: each breach names the field and the limit (one check per
service), and documents' tags and attributes are stored once, on their first chunk."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2
from knowstream.ingest.v1 import ingest_pb2
from knowstream.retrieve.v1 import retrieve_pb2
from knowstream.trainer.v1 import trainer_pb2
from services.common.limits import LimitExceeded, LimitSettings
from services.common.settings import CommonSettings
from services.infer.settings import InferSettings
from services.infer.validation import check_ask, check_feedback, check_score
from services.ingest.chunking import Chunker
from services.ingest.documents import InvalidDocument, clean_document
from services.ingest.pipeline import IngestPipeline, RawInput
from services.retrieve.dense import FaissBackend
from services.retrieve.index import HybridIndex
from services.trainer.jobs import check_gate_overrides
from services.trainer.settings import TrainerSettings
from tests.unit.ingest.fakes import FakeLog, FakeRegistry

MB = 1 << 20


def test_a_breach_names_the_field_the_limit_and_the_setting():
    limits = LimitSettings(limit_tags=2, limit_tag_chars=5)
    with pytest.raises(LimitExceeded, match=r"^x has 3 entries; the limit is 2 \(KS_LIMIT_TAGS\)"):
        limits.check_list("x", ["a", "b", "c"], "limit_tags")
    with pytest.raises(LimitExceeded, match=r"x\[1\] has 6 characters; the limit is 5"):
        limits.check_list("x", ["a", "bbbbbb"], "limit_tags", "limit_tag_chars")
    limits.check_list("x", ["a", "bbbbb"], "limit_tags", "limit_tag_chars")


def test_grpc_messages_may_not_exceed_the_broker_record_limit():
    with pytest.raises(ValueError, match="KS_GRPC_MAX_MESSAGE_BYTES"):
        CommonSettings(kafka_max_record_bytes=2 * MB, grpc_max_message_bytes=4 * MB)
    assert CommonSettings().grpc_max_message_bytes <= CommonSettings().kafka_max_record_bytes


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"tags": [f"t{i}" for i in range(5)]}, "metadata.tags has 5 entries; the limit is 4"),
        ({"tags": ["x" * 9]}, "metadata.tags[0] has 9 characters; the limit is 8"),
        ({"attributes": {f"k{i}": "v" for i in range(4)}}, "metadata.attributes has 4"),
        ({"attributes": {"k": "v" * 11}}, "metadata.attributes['k'] has 11 characters"),
        ({"source": "s" * 21}, "metadata.source has 21 characters; the limit is 20"),
    ],
)
def test_document_metadata_over_its_caps_is_rejected(metadata, field):
    limits = LimitSettings(
        limit_tags=4, limit_tag_chars=8, limit_attributes=3, limit_attribute_chars=10,
        limit_label_chars=20,
    )  # fmt: skip
    with pytest.raises(InvalidDocument) as caught:
        clean_document("d", "T", "Some text.", max_bytes=MB, limits=limits, **metadata)
    assert str(caught.value).startswith(f"document 'd': {field}")


def pipeline(tokenizer, limits: LimitSettings | None = None) -> tuple[IngestPipeline, FakeLog]:
    log = FakeLog()
    chunker = Chunker(tokenizer, 32, 4)
    return IngestPipeline(chunker, FakeRegistry(), log.publish, "c", MB, limits=limits), log


def test_the_raw_topic_path_rejects_with_the_cap_as_reason(tokenizer):
    # What the raw-documents consumer dead-letters is the result's error (services/ingest).
    p, _ = pipeline(tokenizer, LimitSettings(limit_tags=1))
    result = asyncio.run(p.ingest([RawInput("d", "", "Text.", tags=("a", "b"))]))[0]
    assert result.status == ingest_pb2.INGEST_STATUS_REJECTED
    assert "metadata.tags has 2 entries; the limit is 1 (KS_LIMIT_TAGS)" in result.error


def test_tags_and_attributes_travel_once_per_document_and_hits_still_carry_them(tokenizer):
    p, log = pipeline(tokenizer)
    text = " ".join(f"Sentence number {i} says something about statins." for i in range(40))
    doc = RawInput("d", "T", text, "pubmed", "medicine", ("t1",), {"k": "v"}, ("oncology",))
    asyncio.run(p.ingest([doc]))
    chunks = [events_pb2.KnowledgeEvent.FromString(r[2]).chunk for r in log.records]
    assert len(chunks) > 2
    assert list(chunks[0].metadata.tags) == ["t1"] and dict(chunks[0].metadata.attributes)
    for c in chunks[1:]:  # filters and access control still see every chunk's fields
        assert not c.metadata.tags and not c.metadata.attributes
        assert (c.metadata.source, c.metadata.domain) == ("pubmed", "medicine")
        assert list(c.metadata.access_groups) == ["oncology"]
    index = HybridIndex(FaissBackend(4, "flat"), 4)
    vector = np.ones(4, dtype=np.float32) / 2
    index.add([events_pb2.EmbeddedChunk(chunk=c, vector=vector.tolist()) for c in chunks])
    assert list(index.metadata(chunks[-1]).tags) == ["t1"]
    assert dict(index.metadata(chunks[-1]).attributes) == {"k": "v"}


def test_ask_score_and_feedback_caps():
    s = InferSettings(limit_query_chars=10, limit_stop_strings=1, limit_candidate_chars=3)
    with pytest.raises(LimitExceeded, match=r"question has 11 characters; the limit is 10"):
        check_ask(infer_pb2.AskRequest(question="q" * 11), s)
    with pytest.raises(LimitExceeded, match=r"stop has 2 entries; the limit is 1"):
        check_ask(infer_pb2.AskRequest(question="q", stop=["a", "b"]), s)
    with pytest.raises(LimitExceeded, match=r"candidates\[1\] has 4 characters"):
        check_score(infer_pb2.ScoreRequest(prompt="p", candidates=["yes", "yess"]), s)
    check_ask(infer_pb2.AskRequest(question="q" * 10, stop=["a"], candidates=["yes", "no"]), s)
    f = InferSettings(limit_correction_chars=5, limit_comment_chars=5)
    with pytest.raises(LimitExceeded, match=r"correction has 6 characters"):
        check_feedback(infer_pb2.FeedbackRequest(request_id="r", correction="c" * 6), f)
    with pytest.raises(LimitExceeded, match=r"comment has 6 characters"):
        check_feedback(infer_pb2.FeedbackRequest(request_id="r", rating=1, comment="c" * 6), f)


def test_search_filter_lists_are_capped():
    limits = LimitSettings(limit_filter_values=2)
    f = retrieve_pb2.SearchFilters(doc_ids=["a", "b", "c"])
    with pytest.raises(LimitExceeded, match=r"filters.doc_ids has 3 entries; the limit is 2"):
        limits.check_search_filters(f)


def test_train_gate_overrides_are_capped():
    s = TrainerSettings(limit_reason_chars=5, limit_gate_eval_items=100)
    with pytest.raises(LimitExceeded, match=r"gate.force_reason has 6 characters"):
        check_gate_overrides(trainer_pb2.GateOverrides(force_reason="r" * 6), s)
    with pytest.raises(LimitExceeded, match=r"gate.min_eval_items=101 is above the limit of 100"):
        check_gate_overrides(trainer_pb2.GateOverrides(min_eval_items=101), s)
