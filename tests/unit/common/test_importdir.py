"""Server-side paths named by clients: only regular files inside the import directory."""

from __future__ import annotations

import os
import time

import pytest

from services.common.importdir import (
    ImportPathError,
    copy_import_file,
    read_import_file,
    resolve_import_dir,
    resolve_import_path,
)

LIMIT = 1024


@pytest.fixture
def import_dir(tmp_path):
    root = tmp_path / "import"
    (root / "adapters").mkdir(parents=True)
    (root / "data.json").write_text("{}", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("outside", encoding="utf-8")
    return root


def test_a_file_inside_by_relative_or_absolute_path(import_dir):
    assert resolve_import_path("data.json", import_dir, LIMIT) == (import_dir / "data.json")
    assert read_import_file(str(import_dir / "data.json"), import_dir, LIMIT) == b"{}"
    assert resolve_import_dir("adapters", import_dir) == import_dir / "adapters"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../secret.txt", "outside the import directory"),
        ("adapters/../../secret.txt", "outside the import directory"),
        ("/etc/hostname", "outside the import directory"),
        ("/dev/zero", "outside the import directory"),
        ("missing.json", "does not exist"),
        ("", "no path"),
        ("data\x00.json", "NUL"),
    ],
)
def test_paths_out_of_the_import_directory_are_refused(import_dir, path, message):
    start = time.monotonic()
    with pytest.raises(ImportPathError, match=message):
        read_import_file(path, import_dir, LIMIT)
    assert time.monotonic() - start < 1


def test_symlinks_out_are_refused_and_symlinks_inside_followed(import_dir):
    (import_dir / "out").symlink_to(import_dir.parent / "secret.txt")
    (import_dir / "zero").symlink_to("/dev/zero")
    (import_dir / "dir-out").symlink_to(import_dir.parent)
    (import_dir / "in").symlink_to(import_dir / "data.json")
    for name in ("out", "zero", "dir-out/secret.txt"):
        with pytest.raises(ImportPathError, match="outside"):
            read_import_file(name, import_dir, LIMIT)
    with pytest.raises(ImportPathError, match="outside"):
        resolve_import_dir("dir-out", import_dir)
    assert read_import_file("in", import_dir, LIMIT) == b"{}"


def test_only_regular_files_of_bounded_size(import_dir):
    os.mkfifo(import_dir / "fifo")
    start = time.monotonic()
    with pytest.raises(ImportPathError, match="not a regular file"):
        read_import_file("fifo", import_dir, LIMIT)  # and never blocks on it
    with pytest.raises(ImportPathError, match="not a regular file"):
        read_import_file("adapters", import_dir, LIMIT)
    with pytest.raises(ImportPathError, match="not a directory"):
        resolve_import_dir("data.json", import_dir)
    (import_dir / "big.bin").write_bytes(b"x" * (LIMIT + 1))
    with pytest.raises(ImportPathError, match="limit"):
        read_import_file("big.bin", import_dir, LIMIT)
    with pytest.raises(ImportPathError, match="limit"):
        copy_import_file("big.bin", import_dir, LIMIT, import_dir / "copy")
    assert time.monotonic() - start < 1
    assert copy_import_file("data.json", import_dir, LIMIT, import_dir / "copy") == 2


def test_a_local_file_is_staged_into_the_import_directory(tmp_path):
    from services.common.importdir import resolve_import_path, stage_for_import

    root = tmp_path / "import"
    outside = tmp_path / "data.json"
    outside.write_text("{}", encoding="utf-8")
    name = stage_for_import(outside, root)
    assert (
        name == "data.json"
        and resolve_import_path(name, root, 10).read_text(encoding="utf-8") == "{}"
    )
    assert stage_for_import(root / "data.json", root) == "data.json"  # already inside: no copy
