"""The training child process of one job (``python -m services.trainer.train JOB_DIR``): started
with the job directory, its stdout read as JSON lines (progress, resumed, dev, done) within the
progress timeout, its stderr appended to the job's ``train.log``.

A child is used rather than a thread so that a cancelled or failed run releases its memory and
its torch threads, and so that a trainer killed mid-run takes the run with it (DIE_WITH_PARENT)
while the checkpoints stay for the resume.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.trainer.native_ops import clear_stale_locks, extensions_dir
from services.trainer.train import DIE_WITH_PARENT, child_env
from services.trainer.watchdog import lines_within

Line = dict[str, Any]


class TrainingFailed(RuntimeError):
    """The child exited with an error, or without its final ``done`` line."""


async def run_training(
    job_dir: Path,
    cache_dir: Path,
    progress_timeout_s: float,
    started: Callable[[asyncio.subprocess.Process], None],
    on_line: Callable[[Line], Awaitable[None]],
) -> Line:
    """Runs the child to its end and returns its ``done`` line; ``started`` gets the process
    (to kill it on cancel), ``on_line`` every other JSON line it prints."""
    log_path = job_dir / "train.log"
    stderr = await asyncio.to_thread(open, log_path, "ab")
    try:
        # A lock left by a process killed while building an op would hold this one for ever.
        await asyncio.to_thread(clear_stale_locks, extensions_dir(cache_dir))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.trainer.train",
            str(job_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**child_env(cache_dir), DIE_WITH_PARENT: str(os.getpid())},
        )
        started(process)
        summary: Line = {}
        async for raw in lines_within(
            process, progress_timeout_s, "the training process", "KS_TRAINER_PROGRESS_TIMEOUT_S"
        ):
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a library printing to stdout
            if not isinstance(line, dict):
                continue
            if line.get("event") == "done":
                summary = line
            else:
                await on_line(line)
        code = await process.wait()
    finally:
        stderr.close()
    if code != 0 or not summary:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise TrainingFailed(f"training process exited with {code}: {tail}")
    return summary
