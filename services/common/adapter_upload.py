"""Client side of ``AdapterAdminService/UploadAdapter``: a peft adapter directory (or a tar of
one) sent as bytes, so the server never reads a path the client names. The CLI, the tests and
the benchmarks register adapters this way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.adapters import ADAPTER_FILES

CHUNK_BYTES = 1 << 20


def upload_requests(
    path: Path,
    *,
    description: str = "",
    parent: str = "",
    load: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[infer_pb2.UploadAdapterChunk]:
    """The info message, then the directory's two files (or the tar ``path``) in chunks."""
    yield infer_pb2.UploadAdapterChunk(
        info=infer_pb2.UploadAdapterInfo(description=description, parent=parent, load=load)
    )
    path = Path(path)
    if path.is_dir():
        for name in ADAPTER_FILES:
            with open(path / name, "rb") as f:
                while data := f.read(chunk_bytes):
                    yield infer_pb2.UploadAdapterChunk(
                        file=infer_pb2.AdapterFileChunk(name=name, data=data)
                    )
        return
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            yield infer_pb2.UploadAdapterChunk(tar=data)


def upload_adapter(
    stub: infer_pb2_grpc.AdapterAdminServiceStub,
    path: Path,
    *,
    timeout: float,
    description: str = "",
    parent: str = "",
    load: bool = False,
) -> infer_pb2.AdapterStatus:
    requests = upload_requests(path, description=description, parent=parent, load=load)
    return stub.UploadAdapter(requests, timeout=timeout)
