"""Integration fixtures: a whole stack (Tansu broker, its own Redis, every service) on free
ports in a temporary run directory, so the tests never touch a developer's `make up` stack."""

from __future__ import annotations

import os
import socket
import time

import pytest

from deploy.stack import Stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stack")
    env = {
        "KS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "KS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "KS_INGEST_PORT": str(free_port()),
        "KS_EMBED_PORT": str(free_port()),
        "KS_RETRIEVE_PORT": str(free_port()),
        "KS_INFER_PORT": str(free_port()),
        "KS_TRITON_GRPC_PORT": str(free_port()),
        "KS_TRITON_HTTP_PORT": str(free_port()),
        "KS_TRITON_METRICS_PORT": str(free_port()),
        "KS_REDIS_PREFIX": "kstest",
        "KS_RUN_DIR": str(run_dir),
        "KS_LOG_LEVEL": "INFO",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the clients in the tests read the same settings
    s = Stack(run_dir, env)
    try:
        s.up(timeout_s=300)
        yield s
    finally:
        s.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")
