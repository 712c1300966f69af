"""Adapters as bytes: the safetensors header and adapter config checks, the upload stream and
tars, and RegisterAdapter's import-directory copy."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import tarfile

import numpy as np
import pytest
from safetensors.numpy import save

from knowstream.infer.v1 import infer_pb2
from services.common.adapter_upload import upload_requests
from services.common.importdir import ImportPathError
from services.infer.upload import (
    AdapterRejected,
    check_config,
    check_dir,
    check_safetensors,
    import_dir_files,
    receive,
)

CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


def weights() -> bytes:
    a = np.zeros((8, 16), dtype=np.float32)
    return save({"base_model.model.q_proj.lora_A.weight": a, "x.lora_B.weight": a.T.copy()})


def write_adapter(path, config=CONFIG, data=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "adapter_model.safetensors").write_bytes(weights() if data is None else data)
    return path


def check(data: bytes) -> int:
    return check_safetensors(io.BytesIO(data), len(data))


def test_a_real_safetensors_file_passes():
    assert check(weights()) == 2


def _with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not safetensors"),
        (b"PK\x03\x04 a zip, not tensors", "not safetensors"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (weights()[:-4], "bytes, the header describes"),
        (weights() + b"\0" * 4, "bytes, the header describes"),
        (_with_header({"lora_A": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}})
         + b"x", "dtype"),
        (_with_header({"lora_A": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})
         + b"xxxx", "offsets"),
        (_with_header({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
         "no LoRA tensors"),
    ],
)  # fmt: skip
def test_what_is_not_safetensors_is_refused(data, message):
    with pytest.raises(AdapterRejected, match=message):
        check(data)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b"\xff", "not JSON"),
        (b"[1]", "JSON object"),
        (json.dumps({**CONFIG, "peft_type": "PROMPT_TUNING"}).encode(), "LORA"),
        (json.dumps({**CONFIG, "r": 0}).encode(), "rank"),
        (json.dumps({**CONFIG, "target_modules": []}).encode(), "target_modules"),
        (json.dumps({**CONFIG, "lora_alpha": "big"}).encode(), "lora_alpha"),
    ],
)
def test_bad_adapter_configs_are_refused(config, message):
    with pytest.raises(AdapterRejected, match=message):
        check_config(config)


async def _stream(messages):
    for m in messages:
        yield m


def _receive(messages, staging, limit=1 << 20):
    return asyncio.run(receive(_stream(messages), staging, limit))


def test_an_upload_of_the_two_files(tmp_path):
    source = write_adapter(tmp_path / "src")
    messages = list(upload_requests(source, description="d", load=True, chunk_bytes=100))
    staging = tmp_path / "staging"
    staging.mkdir()
    info = _receive(messages, staging)
    assert info.description == "d" and info.load
    check_dir(staging)
    assert (staging / "adapter_model.safetensors").read_bytes() == weights()


def test_an_upload_of_a_tar_takes_only_the_two_files(tmp_path):
    source = write_adapter(tmp_path / "src")
    tar_path = tmp_path / "a.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(source / "adapter_config.json", "lora/adapter_config.json")
        tar.add(source / "adapter_model.safetensors", "../../adapter_model.safetensors")
        evil = tarfile.TarInfo("lora/README.md")
        evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(evil)
    staging = tmp_path / "staging"
    staging.mkdir()
    _receive(list(upload_requests(tar_path, chunk_bytes=64)), staging)
    check_dir(staging)
    assert sorted(p.name for p in staging.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_uploads_that_break_the_rules(tmp_path):
    def chunk(name, data=b"x"):
        return infer_pb2.UploadAdapterChunk(file=infer_pb2.AdapterFileChunk(name=name, data=data))

    info = infer_pb2.UploadAdapterChunk(info=infer_pb2.UploadAdapterInfo())
    cases = [
        ([chunk("adapter_config.json", b"x" * 2000)], "over the limit"),
        ([chunk("../../etc/cron.d/x")], "unexpected file"),
        ([chunk("adapter_config.json"), info], "first message"),
        ([chunk("adapter_config.json"), chunk("adapter_model.safetensors"),
          chunk("adapter_config.json")], "two separate runs"),
        ([chunk("adapter_config.json"), infer_pb2.UploadAdapterChunk(tar=b"x")], "not both"),
        ([info], "no adapter files"),
        ([info, infer_pb2.UploadAdapterChunk(tar=b"not a tar at all")], "tar"),
    ]  # fmt: skip
    for n, (messages, message) in enumerate(cases):
        staging = tmp_path / f"s{n}"
        staging.mkdir()
        with pytest.raises(AdapterRejected, match=message):
            _receive(messages, staging, limit=1000)


def test_a_staged_non_adapter_is_refused(tmp_path):
    with pytest.raises(AdapterRejected, match="not safetensors"):
        check_dir(write_adapter(tmp_path / "a", data=b"\x80\x04 a pickle"))
    (tmp_path / "b").mkdir()
    with pytest.raises(AdapterRejected, match="lacks"):
        check_dir(tmp_path / "b")


def test_register_copies_only_from_the_import_directory(tmp_path):
    root = tmp_path / "import"
    write_adapter(root / "good")
    write_adapter(tmp_path / "outside")
    (root / "link").mkdir()
    (root / "link" / "adapter_config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    (root / "link" / "adapter_model.safetensors").symlink_to("/dev/zero")
    staging = tmp_path / "staging"
    staging.mkdir()
    import_dir_files("good", root, staging, 1 << 20)
    check_dir(staging)
    for path, message in (
        (str(tmp_path / "outside"), "outside"),
        ("../outside", "outside"),
        ("link", "outside"),
        ("good", "limit"),
    ):
        with pytest.raises(ImportPathError, match=message):
            import_dir_files(path, root, staging, 100 if path == "good" else 1 << 20)
