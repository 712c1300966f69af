"""The stack's own Redis keeps its data: across `make down && make up`, across a SIGKILL (the
append-only file is replayed), and when stack.json is lost; another Redis is used only when
named on purpose. Starts Redis alone, through the same Stack code path as `make up`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from deploy import local_state
from deploy.stack import Stack, pid_alive
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"KS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "KS_RUN_DIR": str(tmp_path)}


def start(env: dict[str, str]) -> Stack:
    """What `make up` does for Redis, from a fresh process's point of view."""
    stack = Stack(env["KS_RUN_DIR"], env)
    stack.start_redis()
    return stack


def client(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.settings.redis_url, socket_timeout=5)


def write(stack: Stack, n: int) -> None:
    r = client(stack)
    for i in range(n):
        r.hset(f"ks:doc:{i}", mapping={"version": str(i), "text": "x" * 100})
    r.set("ks:offsets", "525")
    r.close()


def assert_back(stack: Stack, n: int) -> None:
    r = client(stack)
    assert r.get("ks:offsets") == b"525"
    assert sum(1 for _ in r.scan_iter("ks:doc:*", count=1000)) == n
    assert r.hget(f"ks:doc:{n - 1}", "version") == str(n - 1).encode()
    r.close()


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_state_survives_a_sigkill_of_redis(env: dict[str, str]) -> None:
    stack = start(env)
    try:
        config = local_state.redis_config(stack.settings.redis_url)
        assert config["appendonly"] == "yes" and config["save"]
        assert Path(config["dir"]) == stack.run_dir / "redis"
        write(stack, 500)
        time.sleep(1.5)  # appendfsync everysec: at most the last second is at risk
        # Fewer writes than a snapshot needs: what comes back is the append-only file's.
        assert not (stack.run_dir / "redis" / "dump.rdb").exists()
        kill(stack.components["redis"].pid)
        assert (stack.run_dir / "redis" / "appendonlydir").is_dir()
        stack = start(env)  # the recorded pid is dead: started again on the same data
        assert_back(stack, 500)
    finally:
        stack.down()


def test_state_survives_down_and_up_and_a_lost_stack_json(env: dict[str, str]) -> None:
    stack = start(env)
    try:
        write(stack, 50)
        stack.down()
        assert not local_state.redis_answers("127.0.0.1", stack.redis_port)
        stack = start(env)
        assert_back(stack, 50)
        pid = stack.components["redis"].pid
        stack.state_file.unlink()  # e.g. `make clean` of an older checkout
        stack = start(env)  # recognised as the stack's own by its data dir, not a foreign one
        assert stack.components["redis"].pid == pid
        assert_back(stack, 50)
        stack.down()
        assert not pid_alive(pid)
        assert local_state.clean_data(stack.run_dir, stack.env) == [stack.run_dir / "redis"]
        stack = start(env)
        assert client(stack).dbsize() == 0
    finally:
        stack.down()


def test_another_redis_is_used_only_on_purpose_and_never_stopped(
    env: dict[str, str], tmp_path: Path
) -> None:
    port = int(env["KS_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    other = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not local_state.redis_answers("127.0.0.1", port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="not this stack's"):
            local_state.answering_redis(
                env["KS_REDIS_URL"], local_state.redis_dir(tmp_path), external=False
            )
        stack = start(env)  # KS_REDIS_URL names it: used as it is
        assert "redis" not in stack.components
        stack.down()
        assert local_state.redis_answers("127.0.0.1", port)
        rows = {row["component"]: row for row in stack.status()}
        assert rows["redis"]["started_by"] == "external"
    finally:
        other.terminate()
        other.wait(10)


def test_clean_data_keeps_what_lies_outside_the_run_dir(tmp_path: Path) -> None:
    run_dir, elsewhere = tmp_path / "run", tmp_path / "mine"
    for path in (run_dir / "redis", run_dir / "trainer", run_dir / "logs", elsewhere):
        path.mkdir(parents=True)
    env = {"KS_ADAPTER_DIR": str(elsewhere)}
    assert set(local_state.clean_data(run_dir, env)) == {run_dir / "redis", run_dir / "trainer"}
    assert elsewhere.is_dir() and (run_dir / "logs").is_dir()
