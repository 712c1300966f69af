"""Adapters taken in as bytes (UploadAdapter) or from the import directory (RegisterAdapter):
staged in a private directory, checked, and only then handed to the store.

The checks are what a served adapter needs and no more: a size limit on everything received,
an adapter config that is a JSON object describing a LoRA adapter, and a safetensors file whose
header parses and whose tensors exactly fill the data that follows it (so a truncated, padded
or non-safetensors file is refused before Triton ever opens it). The files are never unpickled
or executed: safetensors holds raw tensors only, which is why it is the one weights format
taken.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import struct
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from knowstream.infer.v1 import infer_pb2
from services.common.adapters import ADAPTER_FILES
from services.common.errors import InvalidArgument
from services.common.importdir import copy_import_file, resolve_import_dir

CONFIG, WEIGHTS = ADAPTER_FILES
MAX_CONFIG_BYTES = 1 << 20
# The safetensors format's own limit on its JSON header.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class AdapterRejected(InvalidArgument):
    """Not an adapter we store: the message says why (the RPC answers INVALID_ARGUMENT)."""


def check_config(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterRejected(f"{CONFIG} is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{CONFIG} is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"{CONFIG} must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterRejected(f"{CONFIG}: peft_type {config['peft_type']!r} is not LORA")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 4096:
        raise AdapterRejected(f"{CONFIG}: r must be an integer rank in 1..4096, not {r!r}")
    modules = config.get("target_modules")
    if not (
        isinstance(modules, str)
        or (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules))
    ):
        raise AdapterRejected(f"{CONFIG}: target_modules must name the modules adapted")
    alpha = config.get("lora_alpha", 1)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterRejected(f"{CONFIG}: lora_alpha must be a number")
    return config


def check_safetensors(f: BinaryIO, size: int) -> int:
    """Parses the header of a safetensors file of ``size`` bytes; returns the tensor count."""
    if size < 8:
        raise AdapterRejected(f"{WEIGHTS} is not safetensors ({size} bytes)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise AdapterRejected(f"{WEIGHTS} is not safetensors (header length {n} of {size})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterRejected(f"{WEIGHTS} is not safetensors (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterRejected(f"{WEIGHTS}: the header must be a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterRejected(f"{WEIGHTS}: __metadata__ must map strings to strings")
    spans = []
    for name, t in header.items():
        if not isinstance(t, dict) or t.get("dtype") not in DTYPE_BYTES:
            raise AdapterRejected(f"{WEIGHTS}: tensor {name!r} has no known dtype")
        shape, offsets = t.get("shape"), t.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise AdapterRejected(f"{WEIGHTS}: tensor {name!r} has a malformed shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
            or offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[t["dtype"]]
        ):
            raise AdapterRejected(f"{WEIGHTS}: tensor {name!r} has malformed data offsets")
        spans.append((offsets[0], offsets[1]))
    if not any("lora_" in name for name in header):
        raise AdapterRejected(f"{WEIGHTS} holds no LoRA tensors (no name contains 'lora_')")
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise AdapterRejected(f"{WEIGHTS}: tensor data overlaps or leaves a gap")
        end = stop
    if 8 + n + end != size:
        raise AdapterRejected(f"{WEIGHTS}: {size} bytes, the header describes {8 + n + end}")
    return len(spans)


def check_dir(staging: Path) -> None:
    """Both files present and valid (runs in a thread: file work)."""
    missing = [name for name in ADAPTER_FILES if not (staging / name).is_file()]
    if missing:
        raise AdapterRejected(f"the adapter lacks {', '.join(missing)}")
    check_config((staging / CONFIG).read_bytes())
    with open(staging / WEIGHTS, "rb") as f:
        check_safetensors(f, (staging / WEIGHTS).stat().st_size)


def new_staging(adapter_dir: Path) -> Path:
    """A private directory beside the store (same file system); hidden, so nothing takes it
    for a stored adapter."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    staging = adapter_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    return staging


def remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def extract_tar(tar_path: Path, staging: Path, max_bytes: int) -> None:
    """The two adapter files out of a tar (any directory inside; other members ignored). Only
    regular members are read, by content, never extracted by their names."""
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            taken = 0
            for member in tar:
                name = Path(member.name).name
                if name not in ADAPTER_FILES or not member.isfile():
                    continue
                if (staging / name).exists():
                    raise AdapterRejected(f"the tar holds {name} twice")
                taken += member.size
                if taken > max_bytes:
                    raise AdapterRejected(f"the tar's adapter files are over {max_bytes} bytes")
                source = tar.extractfile(member)
                assert source is not None  # a regular member
                with source, open(staging / name, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    except tarfile.TarError as exc:
        raise AdapterRejected(f"not a readable tar ({exc})") from None


def import_dir_files(path: str, import_dir: Path, staging: Path, max_bytes: int) -> None:
    """RegisterAdapter: the two files of an adapter directory inside the import directory."""
    source = resolve_import_dir(path, import_dir)
    total = 0
    for name in ADAPTER_FILES:
        # Each file through the checked open (inside, regular, capped), by its path inside.
        left = max_bytes - total
        total += copy_import_file(str(source / name), import_dir, left, staging / name)


async def receive(
    requests: AsyncIterator[infer_pb2.UploadAdapterChunk], staging: Path, max_bytes: int
) -> infer_pb2.UploadAdapterInfo:
    """Writes an upload's files into ``staging`` (a tar's two files taken out of it), refusing
    it as soon as it passes ``max_bytes`` or breaks the message order; returns its info."""
    info = infer_pb2.UploadAdapterInfo()
    total, first, current = 0, True, ""
    files: dict[str, Any] = {}
    try:
        async for chunk in requests:
            kind = chunk.WhichOneof("kind")
            if kind == "info":
                if not first:
                    raise AdapterRejected("info must be the first message of an upload")
                info.CopyFrom(chunk.info)
            elif kind is None:
                raise AdapterRejected("an upload message carries neither info, file nor tar")
            else:
                data = chunk.tar if kind == "tar" else chunk.file.data
                name = "upload.tar" if kind == "tar" else chunk.file.name
                if name not in (*ADAPTER_FILES, "upload.tar"):
                    expected = " and ".join(ADAPTER_FILES)
                    raise AdapterRejected(f"unexpected file {name!r}; send {expected}")
                if name != current and name in files:
                    raise AdapterRejected(f"{name} was sent in two separate runs of chunks")
                total += len(data)
                if total > max_bytes:
                    raise AdapterRejected(f"the upload is over the limit of {max_bytes} bytes")
                if name not in files:
                    files[name] = await asyncio.to_thread(open, staging / name, "wb")
                current = name
                await asyncio.to_thread(files[name].write, data)
            first = False
    finally:
        for f in files.values():
            f.close()
    if "upload.tar" in files and len(files) > 1:
        raise AdapterRejected("send either a tar or the two files, not both")
    if not files:
        raise AdapterRejected("the upload carried no adapter files")
    if "upload.tar" in files:
        await asyncio.to_thread(extract_tar, staging / "upload.tar", staging, max_bytes)
        (staging / "upload.tar").unlink()
    return info
