"""DeepSpeed's native ops: built by ``make setup`` rather than by the first training job, and
stale build locks cleared before a training process starts.

torch's JIT extension build (``torch.utils.cpp_extension``, which DeepSpeed's op builders call)
serialises builds with a bare lock file, ``<extensions dir>/<op>/lock``: created with O_EXCL,
no owner written in it, held open by the builder and removed when it is done. Every other
process waits for the file to vanish, with no timeout, so a builder killed mid-compile leaves
every later job waiting for ever. Without an owner in the file, the owner is found the other
way round: the process that still has the file open.

    python -m services.trainer.native_ops build     # what make setup runs
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.trainer.train import child_env

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
# Only used where the lock's holder cannot be looked up (no /proc, or a lock of another user):
# a build of DeepSpeed's CPU ops takes about a minute on 2 cores, so a lock this old with no
# library beside it is not a build in progress.
DEFAULT_MAX_AGE_S = 30 * 60
# The ops a training process loads on this machine's accelerator: the CPU communication
# backend builds the shared-memory op whenever deepspeed.comm starts (DS_ACCELERATOR=cpu).
DEEPSPEED_OPS = ("ShareMemCommBuilder",)


@dataclass(frozen=True)
class StaleLock:
    path: Path
    reason: str


def extensions_dir(cache_dir: Path) -> Path:
    """Where training processes build and find their ops (the same place as child_env's)."""
    return Path(child_env(cache_dir)["TORCH_EXTENSIONS_DIR"])


def lock_holders(lock: Path) -> set[int] | None:
    """Pids that have ``lock`` open, or None when that cannot be told (no /proc, or a process
    of the lock's owner whose descriptors this user may not read)."""
    proc = Path("/proc")
    try:
        target = os.path.realpath(lock)
        owner = lock.stat().st_uid
    except OSError:
        return set()
    if not (proc / "self" / "fd").is_dir():
        return None
    holders: set[int] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except FileNotFoundError:
            continue  # exited meanwhile
        except PermissionError:
            try:
                if entry.stat().st_uid == owner:
                    return None
            except OSError:
                pass
            continue
        with fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) == target:
                        holders.add(int(entry.name))
                        break
                except OSError:
                    continue
    return holders


def stale_reason(
    lock: Path, max_age_s: float = DEFAULT_MAX_AGE_S, now: float | None = None
) -> str | None:
    """Why ``lock`` is stale, or None while a build may still own it."""
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    holders = lock_holders(lock)
    if holders is not None:
        if holders:
            return None
        # The builder closes the file just before it removes it: a lock seen without a holder
        # at that instant is gone a moment later.
        time.sleep(0.2)
        if lock.exists() and lock_holders(lock) == set():
            return "no live process holds it (its builder died)"
        return None
    libraries = list(lock.parent.glob("*.so"))
    if age > max_age_s and not libraries:
        return f"older than {max_age_s:.0f}s with no library built"
    return None


def clear_stale_locks(root: Path, max_age_s: float = DEFAULT_MAX_AGE_S) -> list[StaleLock]:
    """Removes the stale build locks under ``root`` (one per op directory); returns them."""
    cleared = []
    for lock in sorted(root.glob(f"*/{LOCK_NAME}")):
        reason = stale_reason(lock, max_age_s)
        if reason is None:
            continue
        lock.unlink(missing_ok=True)
        log.warning("removed the stale build lock %s: %s", lock, reason)
        cleared.append(StaleLock(lock, reason))
    return cleared


def build(cache_dir: Path, ops: tuple[str, ...] = DEEPSPEED_OPS) -> list[str]:
    """Builds (or finds already built) ``ops`` where a training process will look for them;
    returns the names of those built or found."""
    env = child_env(cache_dir)
    os.environ["TORCH_EXTENSIONS_DIR"] = env["TORCH_EXTENSIONS_DIR"]
    os.environ.setdefault("DS_ACCELERATOR", env["DS_ACCELERATOR"])
    root = Path(env["TORCH_EXTENSIONS_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    clear_stale_locks(root)
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    done = []
    for name in ops:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            print(f"{name}: not used on {get_accelerator()._name}, skipped")
            continue
        t = time.perf_counter()
        builder.load()
        print(f"{builder.absolute_name()}: ready in {root} ({time.perf_counter() - t:.1f}s)")
        done.append(name)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer.native_ops")
    parser.add_argument("command", choices=["build", "clear-locks"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from services.trainer.settings import TrainerSettings

    cache_dir = TrainerSettings().cache_dir
    if args.command == "clear-locks":
        for stale in clear_stale_locks(extensions_dir(cache_dir)):
            print(f"removed {stale.path}: {stale.reason}")
        return 0
    try:
        build(cache_dir)
    except Exception as exc:  # a missing compiler, a failed compile: say which, fail setup
        print(f"building DeepSpeed's native ops failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
