"""The progress watchdog, on real child processes: lines pass through, a silent process is
killed and named in the error, a process that ends quietly just ends."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from services.trainer.watchdog import KILL_GRACE_S, NoProgress, lines_within


async def start(code: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )


def test_lines_pass_through_until_the_end() -> None:
    async def check() -> None:
        proc = await start(
            "import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.2)"
        )
        lines = [line async for line in lines_within(proc, 5.0)]
        assert lines == [b"0\n", b"1\n", b"2\n"]
        assert await proc.wait() == 0

    asyncio.run(check())


def test_a_silent_process_is_killed_and_the_error_names_the_timeout() -> None:
    async def check() -> None:
        proc = await start("import time; time.sleep(30)")
        t = time.monotonic()
        with pytest.raises(NoProgress) as caught:
            async for _ in lines_within(proc, 0.5, "training process", "KS_LIMIT"):
                pass
        assert time.monotonic() - t < 5
        assert proc.returncode is not None and proc.returncode < 0  # killed, and reaped
        message = str(caught.value)
        assert "training process reported no progress for 0.5s (KS_LIMIT)" in message
        assert "before its first line" in message
        assert isinstance(caught.value, TimeoutError)

    asyncio.run(check())


def test_the_limit_is_on_the_silence_between_lines_not_the_whole_run() -> None:
    async def check() -> None:
        code = "import time\nprint('a', flush=True)\ntime.sleep(0.3)\nprint('b', flush=True)\n"
        code += "time.sleep(30)"
        proc = await start(code)
        seen = []
        with pytest.raises(NoProgress) as caught:
            async for line in lines_within(proc, 1.0):
                seen.append(line)
        assert seen == [b"a\n", b"b\n"]
        assert "after 2 lines" in str(caught.value)

    asyncio.run(check())


def test_a_grandchild_holding_stdout_open_does_not_hold_the_error_back() -> None:
    async def check() -> None:
        code = "import subprocess, time\nsubprocess.Popen(['sleep', '20'])\ntime.sleep(30)"
        proc = await start(code)
        t = time.monotonic()
        with pytest.raises(NoProgress):
            async for _ in lines_within(proc, 0.5):
                pass
        assert time.monotonic() - t < 0.5 + KILL_GRACE_S + 2
        assert proc.returncode is not None and proc.returncode < 0

    asyncio.run(check())


def test_a_process_without_a_pipe_is_refused() -> None:
    async def check() -> None:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        with pytest.raises(ValueError):
            async for _ in lines_within(proc, 1.0):
                pass
        await proc.wait()

    asyncio.run(check())
