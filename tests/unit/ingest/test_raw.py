import json

import pytest

from knowstream.events.v1 import events_pb2
from services.common.kafka import BadEvent
from services.ingest.raw import parse_raw_record


def test_json_record_with_top_level_metadata():
    raw = parse_raw_record(
        json.dumps({"id": "a", "title": "T", "text": "x", "domain": "law", "tags": ["t1"]}).encode()
    )
    assert (raw.id, raw.domain, raw.tags) == ("a", "law", ("t1",))


def test_protobuf_record():
    doc = events_pb2.RawDocument(
        id="p1", text="body", metadata=events_pb2.DocumentMetadata(source="s")
    )
    raw = parse_raw_record(doc.SerializeToString(), [("content-type", b"application/x-protobuf")])
    assert (raw.id, raw.text, raw.source) == ("p1", "body", "s")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"id": "a", "text": "\xff\xfe"}', "not valid UTF-8"),
        (b"[1, 2]", "neither JSON nor a RawDocument"),
        (b'{"id": "a"}', "'text' is required"),
        (b'{"id": "a", "text": "x", "tags": 5}', "'tags' must be a list"),
        (b"", "empty record"),
    ],
)
def test_bad_records_have_a_reason(value, reason):
    with pytest.raises(BadEvent, match=reason):
        parse_raw_record(value)
