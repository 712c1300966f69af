"""The one way an RPC may read a server-side path a client names: inside the import directory.

Clients used to name any path the server could read (``/etc/hostname`` came back in an error;
``/dev/zero`` exhausted a service's memory on its event loop). Now a path, absolute or relative
to the import directory (``KS_IMPORT_DIR``, default ``<run dir>/import``), is resolved with
every symlink followed, and must still lie inside the directory; files must be regular files no
larger than a cap, and are opened without following a last-moment symlink and without blocking
on a FIFO. These functions do file-system work: call them off the event loop
(``asyncio.to_thread``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from services.common.errors import InvalidArgument


class ImportPathError(InvalidArgument):
    """A path outside the import directory, not a regular file or directory, or too large."""


def _inside(path: str, import_dir: Path) -> Path:
    if not path or "\x00" in path:
        raise ImportPathError("no path given" if not path else "path contains a NUL byte")
    root = import_dir.resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    try:
        # strict: a dangling symlink or a missing file is refused here, not read later.
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ImportPathError(f"{path!r} does not exist in the import directory {root}") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permissions
        raise ImportPathError(f"{path!r} cannot be resolved ({exc})") from None
    if not resolved.is_relative_to(root):
        raise ImportPathError(
            f"{path!r} is outside the import directory {root} (KS_IMPORT_DIR); copy it there "
            "or upload it"
        )
    return resolved


def resolve_import_path(path: str, import_dir: Path, max_bytes: int) -> Path:
    """The regular file ``path`` names inside ``import_dir``, at most ``max_bytes`` long."""
    resolved = _inside(path, import_dir)
    info = resolved.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ImportPathError(f"{path!r} is not a regular file")
    if info.st_size > max_bytes:
        raise ImportPathError(f"{path!r} is {info.st_size} bytes; the limit is {max_bytes}")
    return resolved


def resolve_import_dir(path: str, import_dir: Path) -> Path:
    """The directory ``path`` names inside ``import_dir``."""
    resolved = _inside(path, import_dir)
    if not resolved.is_dir():
        raise ImportPathError(f"{path!r} is not a directory")
    return resolved


def open_import_file(path: str, import_dir: Path, max_bytes: int) -> BinaryIO:
    """:func:`resolve_import_path`'s file, open for reading. Opened with O_NOFOLLOW and
    O_NONBLOCK and checked again on the descriptor, so a file swapped for a symlink, a FIFO or
    a device between the check and the open is refused instead of read (or waited on)."""
    resolved = resolve_import_path(path, import_dir, max_bytes)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImportPathError(f"{path!r} cannot be opened ({exc.strerror})") from None
    f = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        f.close()
        raise ImportPathError(f"{path!r} is not a regular file of at most {max_bytes} bytes")
    return f


def read_import_file(path: str, import_dir: Path, max_bytes: int) -> bytes:
    """The bytes of :func:`open_import_file`'s file; never more than ``max_bytes`` are read
    (a file that grows meanwhile is refused)."""
    with open_import_file(path, import_dir, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImportPathError(f"{path!r} is larger than the limit of {max_bytes} bytes")
    return data


def copy_import_file(path: str, import_dir: Path, max_bytes: int, target: Path) -> int:
    """Copies :func:`open_import_file`'s file to ``target`` in blocks; returns its size."""
    copied = 0
    with open_import_file(path, import_dir, max_bytes) as f, open(target, "wb") as out:
        while block := f.read(1 << 20):
            copied += len(block)
            if copied > max_bytes:
                raise ImportPathError(f"{path!r} is larger than the limit of {max_bytes} bytes")
            out.write(block)
    return copied


def stage_for_import(path: Path, import_dir: Path) -> str:
    """A local file as the server's import directory sees it: its name there, copied in first
    when it lies elsewhere (for a stack on this machine: `knowstream train --data`)."""
    import shutil

    root = import_dir.resolve()
    source = path.resolve()
    if source.is_relative_to(root):
        return str(source.relative_to(root))
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, root / source.name)
    return source.name
