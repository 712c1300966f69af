import pytest

from services.ingest.documents import InvalidDocument, clean_document, normalize_text

MB = 1024 * 1024


def test_normalisation():
    assert normalize_text("  a\t\tb \r\n\r\n\r\n c\x00d ") == "a b\n\ncd"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"doc_id": "", "text": "x"}, "id is required"),
        ({"doc_id": "d1", "text": "   \n\t "}, "text is empty"),
        ({"doc_id": "d1", "text": "x" * (MB + 1)}, "the limit is 1048576 bytes"),
        ({"doc_id": "d1", "text": b"caf\xe9 au lait"}, "not valid UTF-8 (byte 3)"),
        ({"doc_id": "d1", "text": "bad \udc80 surrogate"}, "not valid UTF-8"),
        ({"doc_id": "a" * 300, "text": "x"}, "printable characters"),
    ],
)
def test_invalid_documents_have_clear_messages(kwargs, message):
    with pytest.raises(InvalidDocument, match=message.replace("(", r"\(").replace(")", r"\)")):
        clean_document(kwargs["doc_id"], "", kwargs["text"], max_bytes=MB)


def test_content_hash_tracks_content_and_metadata():
    a = clean_document("d", "T", "Some text.", domain="Medicine", max_bytes=MB)
    same = clean_document("d", "T", "  Some   text. ", domain="medicine", max_bytes=MB)
    other_text = clean_document("d", "T", "Other text.", domain="medicine", max_bytes=MB)
    other_domain = clean_document("d", "T", "Some text.", domain="law", max_bytes=MB)
    assert a.content_hash == same.content_hash
    assert len({a.content_hash, other_text.content_hash, other_domain.content_hash}) == 3
    assert a.domain == "medicine"
