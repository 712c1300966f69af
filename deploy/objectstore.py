"""The embedded broker's durable log: a local S3-compatible object store on disk.

Tansu (the embedded Kafka broker) keeps its log in memory unless it is given an S3 store; this
is the part of S3 its object_store client uses, kept under ``<run dir>/broker``, so that a
broker restart or SIGKILL loses no record it acknowledged and no committed offset. It answers
PutObject, GetObject (with Range), HeadObject, DeleteObject, DeleteObjects, CopyObject and
ListObjectsV2, path-style, on loopback and without authentication (like the stack's Redis).

Conditional writes are the point: Tansu creates a partition's watermark and the cluster's
metadata with ``If-None-Match: *`` and updates them with ``If-Match: <etag>``, and relies on
412 Precondition Failed when the object exists or changed. A store that ignores the conditions
(s3rver, tried here: every broker restart rewrote each partition from offset 0 over the old
records) loses the log on the first restart.

Writes are atomic (a temporary file renamed over the object), so a SIGKILL leaves the old object
or the new one. As Kafka by default (``log.flush.interval.messages`` unset), they are not
fsynced: the page cache survives any process's death, not the machine's; ``--fsync`` syncs
each object and its folder before answering (about 3x slower to produce, measured here).
ETags are the content's MD5, computed when asked (Tansu's objects are small).

Run: ``python -m deploy.objectstore --root DIR --port PORT [--host 127.0.0.1]``.

Over 400 lines because it is a whole (small) server: the store, the S3 XML and HTTP handling
belong together and nothing else uses them.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import logging
import os
import re
import threading
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("objectstore")
# Object files carry a suffix so that keys "a" and "a/b" can both exist (a file and a folder).
SUFFIX = ".object"
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
MAX_KEYS = 1000


class S3Error(Exception):
    def __init__(self, status: HTTPStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ObjectStore:
    """Buckets are folders of ``root``, objects files below them (see SUFFIX)."""

    def __init__(self, root: Path, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():  # a write a SIGKILL interrupted: never renamed, never seen
            stale.unlink(missing_ok=True)
        # Conditional writes check and write under one lock: no other write may come between.
        self.lock = threading.Lock()
        self.counter = 0

    def bucket(self, name: str) -> Path:
        if not name or name.startswith(".") or "/" in name:
            raise S3Error(HTTPStatus.BAD_REQUEST, "InvalidBucketName", f"bad bucket {name!r}")
        return self.root / name

    def path(self, bucket: str, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            raise S3Error(HTTPStatus.BAD_REQUEST, "InvalidArgument", f"bad key {key!r}")
        return self.bucket(bucket) / (key + SUFFIX)

    def existing_bucket(self, name: str) -> Path:
        path = self.bucket(name)
        if not path.is_dir():
            raise S3Error(HTTPStatus.NOT_FOUND, "NoSuchBucket", f"no bucket {name!r}")
        return path

    def read(self, bucket: str, key: str) -> tuple[bytes, os.stat_result]:
        self.existing_bucket(bucket)
        path = self.path(bucket, key)
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            raise S3Error(HTTPStatus.NOT_FOUND, "NoSuchKey", f"no key {key!r}") from None

    def put(
        self, bucket: str, key: str, body: bytes, if_match: str | None, if_none_match: str | None
    ) -> str:
        self.existing_bucket(bucket)
        path = self.path(bucket, key)
        with self.lock:
            # Only a conditional write reads what is there (most writes are new record batches).
            if if_none_match == "*" and path.exists():
                raise S3Error(HTTPStatus.PRECONDITION_FAILED, "PreconditionFailed", "key exists")
            if if_match is not None and (
                not path.exists() or not etag_matches(if_match, etag_of(path.read_bytes()))
            ):
                raise S3Error(HTTPStatus.PRECONDITION_FAILED, "PreconditionFailed", "etag differs")
            self.counter += 1
            tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{self.counter}"
            with open(tmp, "wb") as f:
                f.write(body)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            if self.fsync:
                fsync_dir(path.parent)
        return etag_of(body)

    def delete(self, bucket: str, key: str) -> None:
        self.existing_bucket(bucket)
        path = self.path(bucket, key)
        with self.lock:
            path.unlink(missing_ok=True)

    def keys(self, bucket: str, prefix: str) -> list[str]:
        """The bucket's keys that start with ``prefix``, sorted."""
        root = self.existing_bucket(bucket)
        # Walk only below the prefix's folder part.
        start = root / prefix.rpartition("/")[0] if "/" in prefix else root
        found = []
        for dirpath, _, files in os.walk(start):
            for name in files:
                if name.endswith(SUFFIX):
                    key = (Path(dirpath) / name).relative_to(root).as_posix()[: -len(SUFFIX)]
                    if key.startswith(prefix):
                        found.append(key)
        return sorted(found)


def etag_of(body: bytes) -> str:
    return f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'


def etag_matches(header: str, etag: str) -> bool:
    wanted = {t.strip() for t in header.split(",")}
    return "*" in wanted or etag in wanted or etag.strip('"') in wanted


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def http_date(st: os.stat_result) -> str:
    return email.utils.formatdate(st.st_mtime, usegmt=True)


def iso_date(st: os.stat_result) -> str:
    return datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def element(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    child = ET.SubElement(parent, tag)
    if text is not None:
        child.text = text
    return child


def list_objects(store: ObjectStore, bucket: str, query: dict[str, str]) -> bytes:
    """ListObjectsV2: keys after the continuation token (or start-after), CommonPrefixes for a
    delimiter, at most max-keys entries."""
    prefix = query.get("prefix", "")
    delimiter = query.get("delimiter", "")
    after = query.get("continuation-token") or query.get("start-after", "")
    limit = max(1, min(int(query.get("max-keys", MAX_KEYS)), MAX_KEYS))
    result = ET.Element("ListBucketResult", xmlns=S3_NS)
    element(result, "Name", bucket)
    element(result, "Prefix", prefix)
    if delimiter:
        element(result, "Delimiter", delimiter)
    element(result, "MaxKeys", str(limit))
    entries: list[tuple[str, bool]] = []  # (key or common prefix, is a common prefix)
    for key in store.keys(bucket, prefix):
        rest = key[len(prefix) :]
        if delimiter and delimiter in rest:
            entry = (prefix + rest[: rest.index(delimiter) + len(delimiter)], True)
            if entries and entries[-1] == entry:  # keys are sorted: a prefix's keys are adjacent
                continue
        else:
            entry = (key, False)
        if entry[0] > after:
            entries.append(entry)
    truncated = len(entries) > limit
    entries = entries[:limit]
    listed = 0
    for name, common in entries:
        if common:
            element(element(result, "CommonPrefixes"), "Prefix", name)
            listed += 1
            continue
        # Only the keys returned are looked at (Tansu lists a partition on every fetch).
        try:
            stat = store.path(bucket, name).stat()
        except FileNotFoundError:  # deleted since it was listed
            continue
        contents = element(result, "Contents")
        element(contents, "Key", name)
        element(contents, "LastModified", iso_date(stat))
        element(contents, "Size", str(stat.st_size))
        element(contents, "StorageClass", "STANDARD")
        listed += 1
    element(result, "KeyCount", str(listed))
    element(result, "IsTruncated", "true" if truncated else "false")
    if truncated:
        element(result, "NextContinuationToken", entries[-1][0])
    return xml(result)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write, without Nagle: two small writes of one response
    # waited for the client's delayed ACK (~40 ms a request, 10 s to read 2,000 records).
    wbufsize = -1
    disable_nagle_algorithm = True
    server: ObjectStoreServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug(format, *args)

    # -- plumbing ------------------------------------------------------------------------------
    def _target(self) -> tuple[str, str, dict[str, str]]:
        url = urlsplit(self.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        return bucket, key, query

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length", 0))
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: HTTPStatus,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, err: S3Error, head: bool = False) -> None:
        doc = ET.Element("Error")
        element(doc, "Code", err.code)
        element(doc, "Message", err.message)
        # A request body may be left unread: the connection cannot carry another request.
        self.close_connection = True
        self._send(err.status, xml(doc), {"Content-Type": "application/xml"}, head)

    def _run(self, action: str) -> None:
        try:
            getattr(self, f"_{action}")()
        except S3Error as err:
            self._error(err, head=action == "head")
        except Exception as exc:
            log.exception("%s %s failed", self.command, self.path)
            self._error(S3Error(HTTPStatus.INTERNAL_SERVER_ERROR, "InternalError", str(exc)))

    def do_GET(self) -> None:
        self._run("get")

    def do_HEAD(self) -> None:
        self._run("head")

    def do_PUT(self) -> None:
        self._run("put")

    def do_DELETE(self) -> None:
        self._run("delete")

    def do_POST(self) -> None:
        self._run("post")

    # -- operations ----------------------------------------------------------------------------
    def _get(self, head: bool = False) -> None:
        bucket, key, query = self._target()
        store = self.server.store
        if not key:
            if head:
                store.existing_bucket(bucket)
                return self._send(HTTPStatus.OK, head=True)
            if not bucket:
                raise S3Error(HTTPStatus.NOT_IMPLEMENTED, "NotImplemented", "ListBuckets")
            body = list_objects(store, bucket, query)
            return self._send(HTTPStatus.OK, body, {"Content-Type": "application/xml"})
        data, st = store.read(bucket, key)
        etag = etag_of(data)
        headers = {"ETag": etag, "Last-Modified": http_date(st), "Accept-Ranges": "bytes"}
        if_match, if_none = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        if if_match is not None and not etag_matches(if_match, etag):
            raise S3Error(HTTPStatus.PRECONDITION_FAILED, "PreconditionFailed", "etag differs")
        if if_none is not None and etag_matches(if_none, etag):
            return self._send(HTTPStatus.NOT_MODIFIED, headers=headers, length=0)
        status, body = HTTPStatus.OK, data
        wanted = self.headers.get("Range")
        if wanted:
            first, last = byte_range(wanted, len(data))
            status, body = HTTPStatus.PARTIAL_CONTENT, data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        self._send(status, body, headers, head=head, length=len(body))

    def _head(self) -> None:
        self._get(head=True)

    def _put(self) -> None:
        bucket, key, _ = self._target()
        store = self.server.store
        body = self._body()
        if not key:  # CreateBucket
            store.bucket(bucket).mkdir(parents=True, exist_ok=True)
            return self._send(HTTPStatus.OK)
        source = self.headers.get("x-amz-copy-source")
        if source:
            src_bucket, _, src_key = unquote(source).lstrip("/").partition("/")
            body, _ = store.read(src_bucket, src_key)
        etag = store.put(
            bucket, key, body, self.headers.get("If-Match"), self.headers.get("If-None-Match")
        )
        if source:
            result = ET.Element("CopyObjectResult", xmlns=S3_NS)
            element(result, "ETag", etag)
            element(result, "LastModified", iso_date(store.path(bucket, key).stat()))
            return self._send(HTTPStatus.OK, xml(result), {"Content-Type": "application/xml"})
        self._send(HTTPStatus.OK, headers={"ETag": etag})

    def _delete(self) -> None:
        bucket, key, _ = self._target()
        self.server.store.delete(bucket, key)
        self._send(HTTPStatus.NO_CONTENT)

    def _post(self) -> None:
        bucket, key, query = self._target()
        if key or "delete" not in query:
            raise S3Error(HTTPStatus.NOT_IMPLEMENTED, "NotImplemented", f"POST {self.path}")
        request = ET.fromstring(self._body())
        result = ET.Element("DeleteResult", xmlns=S3_NS)
        for obj in request.iter():
            if obj.tag.rpartition("}")[2] != "Object":
                continue
            name = next(c.text or "" for c in obj if c.tag.rpartition("}")[2] == "Key")
            self.server.store.delete(bucket, name)
            element(element(result, "Deleted"), "Key", name)
        self._send(HTTPStatus.OK, xml(result), {"Content-Type": "application/xml"})


def byte_range(header: str, size: int) -> tuple[int, int]:
    """The inclusive (first, last) byte of a ``Range: bytes=a-b`` header."""
    match = RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise S3Error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "InvalidRange", header)
    start, end = match.groups()
    if start == "":  # the last N bytes
        first, last = max(0, size - int(end)), size - 1
    else:
        first, last = int(start), min(int(end), size - 1) if end else size - 1
    if first >= size or first > last:
        raise S3Error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "InvalidRange", header)
    return first, last


class ObjectStoreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: ObjectStore) -> None:
        super().__init__(address, Handler)
        self.store = store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deploy.objectstore", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="folder the buckets live in")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bucket", action="append", default=[], help="created if missing")
    parser.add_argument("--fsync", action="store_true", help="sync every write to disk")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    store = ObjectStore(args.root, fsync=args.fsync)
    for name in args.bucket:
        store.bucket(name).mkdir(parents=True, exist_ok=True)
    server = ObjectStoreServer((args.host, args.port), store)
    log.info("object store on %s:%d, data in %s", args.host, args.port, args.root)
    server.serve_forever()


if __name__ == "__main__":
    main()
