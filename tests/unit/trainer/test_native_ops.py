"""Stale build locks: a lock left by a dead builder is cleared, one held by a live builder is
not, and the age rule applies where the holder cannot be looked up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.trainer import native_ops
from services.trainer.train import child_env

# What torch.utils.cpp_extension does around a build: FileBaton creates the lock with O_EXCL
# and keeps it open until the build is done.
HOLD_LOCK = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)
print("locked", flush=True)
time.sleep(60)
"""


def op_dir(root: Path, name: str = "deepspeed_shm_comm") -> Path:
    path = root / name
    path.mkdir(parents=True)
    return path


def hold(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_lock_left_by_a_killed_builder_is_cleared(tmp_path: Path) -> None:
    lock = op_dir(tmp_path) / native_ops.LOCK_NAME
    builder = hold(lock)
    try:
        assert native_ops.lock_holders(lock) == {builder.pid}
        assert native_ops.clear_stale_locks(tmp_path) == []
        assert lock.exists()
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait()
    assert lock.exists()  # what a killed compile leaves behind
    [stale] = native_ops.clear_stale_locks(tmp_path)
    assert stale.path == lock and "no live process" in stale.reason
    assert not lock.exists()


def test_torch_can_build_again_after_the_stale_lock_is_cleared(tmp_path: Path) -> None:
    from torch.utils.file_baton import FileBaton

    lock = op_dir(tmp_path) / native_ops.LOCK_NAME
    builder = hold(lock)
    builder.kill()
    builder.wait()
    assert not FileBaton(str(lock)).try_acquire()  # every later job would wait here for ever
    native_ops.clear_stale_locks(tmp_path)
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    baton.release()


def test_without_a_holder_lookup_only_old_locks_with_no_library_are_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native_ops, "lock_holders", lambda lock: None)
    fresh = op_dir(tmp_path, "fresh") / native_ops.LOCK_NAME
    old = op_dir(tmp_path, "old") / native_ops.LOCK_NAME
    built = op_dir(tmp_path, "built") / native_ops.LOCK_NAME
    for lock in (fresh, old, built):
        lock.touch()
    (built.parent / "built.so").touch()
    an_hour_ago = time.time() - 3600
    for lock in (old, built):
        os.utime(lock, (an_hour_ago, an_hour_ago))
    cleared = native_ops.clear_stale_locks(tmp_path, max_age_s=1800)
    assert [s.path for s in cleared] == [old]
    assert "older than 1800s with no library built" in cleared[0].reason
    assert fresh.exists() and built.exists()


def test_nothing_to_clear_where_nothing_was_built(tmp_path: Path) -> None:
    assert native_ops.clear_stale_locks(tmp_path / "missing") == []


def test_the_locks_looked_at_are_where_training_processes_build(tmp_path: Path) -> None:
    expected = Path(child_env(tmp_path)["TORCH_EXTENSIONS_DIR"])
    assert native_ops.extensions_dir(tmp_path) == expected == tmp_path / "torch_extensions"
