"""The broker's store answers the S3 calls Tansu makes, conditional writes above all: a create
of an existing object and an update from a stale ETag are refused (412), as real S3 does."""

from __future__ import annotations

import http.client
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.objectstore import S3_NS, SUFFIX, ObjectStore, ObjectStoreServer


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[ObjectStoreServer, Path]]:
    root = tmp_path / "store"
    (root / ".tmp").mkdir(parents=True)
    (root / ".tmp" / "interrupted-write").write_bytes(b"half")
    server = ObjectStoreServer(("127.0.0.1", 0), ObjectStore(root))
    (root / "b").mkdir()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, root
    server.shutdown()
    server.server_close()


def call(
    server: ObjectStoreServer,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    # One connection for every call of a test would also do (keep-alive); a new one each keeps
    # the failures apart.
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def listing(server: ObjectStoreServer, query: str) -> tuple[list[str], list[str], str | None]:
    status, _, body = call(server, "GET", f"/b?list-type=2&{query}")
    assert status == 200
    doc = ET.fromstring(body)
    ns = {"s3": S3_NS}
    keys = [e.text or "" for e in doc.findall("s3:Contents/s3:Key", ns)]
    prefixes = [e.text or "" for e in doc.findall("s3:CommonPrefixes/s3:Prefix", ns)]
    token = doc.findtext("s3:NextContinuationToken", None, ns)
    return keys, prefixes, token


def test_a_write_a_kill_interrupted_is_cleared_at_start(store):
    _, root = store
    assert list((root / ".tmp").iterdir()) == []


def test_create_if_absent_and_update_if_unchanged(store):
    server, _ = store
    status, headers, _ = call(server, "PUT", "/b/w.json", b"v1", {"If-None-Match": "*"})
    assert status == 200
    first = headers["etag"]
    # The same create again: the object exists.
    assert call(server, "PUT", "/b/w.json", b"v0", {"If-None-Match": "*"})[0] == 412
    status, headers, _ = call(server, "PUT", "/b/w.json", b"v2", {"If-Match": first})
    assert status == 200
    # An update from the first version's ETag is stale now.
    assert call(server, "PUT", "/b/w.json", b"v3", {"If-Match": first})[0] == 412
    assert call(server, "PUT", "/b/absent.json", b"x", {"If-Match": first})[0] == 412
    status, got, body = call(server, "GET", "/b/w.json")
    assert (status, body, got["etag"]) == (200, b"v2", headers["etag"])
    assert "last-modified" in got


def test_get_head_range_and_missing_keys(store):
    server, _ = store
    call(server, "PUT", "/b/records/0.batch", b"0123456789")
    assert call(server, "GET", "/b/records/0.batch", headers={"Range": "bytes=2-4"})[2] == b"234"
    assert call(server, "GET", "/b/records/0.batch", headers={"Range": "bytes=-3"})[2] == b"789"
    status, headers, body = call(server, "HEAD", "/b/records/0.batch")
    assert (status, headers["content-length"], body) == (200, "10", b"")
    status, _, body = call(server, "GET", "/b/records/none.batch")
    assert status == 404 and b"NoSuchKey" in body
    assert call(server, "GET", "/nobucket/k")[0] == 404
    assert call(server, "PUT", "/b/../escape", b"x")[0] == 400


def test_list_by_prefix_with_delimiter_and_pages(store):
    server, root = store
    for key in ("t/p0/r/0", "t/p0/r/1", "t/p0/w.json", "t/p1/r/0", "t/p1/w.json", "u"):
        call(server, "PUT", f"/b/{key}", key.encode())
    # Keys "a" and "a/b" both exist (an object beside a folder of the same name).
    call(server, "PUT", "/b/t", b"also an object")
    assert (root / "b" / ("t" + SUFFIX)).exists()
    keys, prefixes, _ = listing(server, "prefix=t/p0/r/")
    assert (keys, prefixes) == (["t/p0/r/0", "t/p0/r/1"], [])
    keys, prefixes, _ = listing(server, "prefix=t/&delimiter=/")
    assert (keys, prefixes) == ([], ["t/p0/", "t/p1/"])
    pages, token = [], ""
    while True:
        keys, _, token = listing(
            server, f"max-keys=2{'&continuation-token=' + token if token else ''}"
        )
        pages.append(keys)
        if token is None:
            break
    assert [k for page in pages for k in page] == sorted(
        ["t", "t/p0/r/0", "t/p0/r/1", "t/p0/w.json", "t/p1/r/0", "t/p1/w.json", "u"]
    )
    assert all(len(p) <= 2 for p in pages)


def test_delete_one_and_many(store):
    server, _ = store
    for key in ("a", "b", "c"):
        call(server, "PUT", f"/b/{key}", b"x")
    assert call(server, "DELETE", "/b/a")[0] == 204
    objects = "".join(f"<Object><Key>{k}</Key></Object>" for k in ("b", "c"))
    request = f'<Delete xmlns="{S3_NS}">{objects}</Delete>'
    status, _, body = call(server, "POST", "/b?delete", request.encode())
    assert status == 200 and body.count(b"<Deleted>") == 2
    assert listing(server, "")[0] == []
