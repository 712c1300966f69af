"""The embedded stack's durable state: its own Redis, the broker's store and the data
directories under the run directory.

The embedded broker (Tansu) keeps its log in an S3-compatible store on local disk
(deploy/objectstore.py, under ``<run dir>/broker``; ``KS_BROKER_STORAGE=memory`` keeps nothing).
Redis holds every other piece of state that must outlive a restart (chunks, offsets, the
adapters' registry and rollout, the monitor's windows, the trainer's jobs). The stack's own
Redis therefore writes an append-only file fsync'd every
second (a SIGKILL loses at most the last second; the file is replayed on start) plus RDB
snapshots, under ``<run dir>/redis``, on loopback only.

Which Redis the stack uses (``KS_REDIS_URL``, default ``redis://127.0.0.1:6390/0``):

1. its own one (recorded in ``stack.json``, or answering with ``<run dir>/redis`` as its data
   directory): reused, and stopped by ``make down``;
2. another Redis answering at the URL: used only if ``KS_REDIS_URL`` is set, i.e. named on
   purpose; the stack never starts nor stops it. Without ``KS_REDIS_URL`` it is refused, so an
   unrelated Redis (such as one that keeps nothing on disk) is never taken by accident;
3. nothing answering on a loopback address: the stack starts its own durable one there.
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

# The stack's own Redis binds to 127.0.0.1 only; it is started for a URL naming one of these.
LOOPBACK = {"127.0.0.1", "localhost"}
# An RDB snapshot within 5 minutes of any write, every minute while busy: a compact copy to
# restore from if the append-only file is ever damaged beyond its truncated tail.
SNAPSHOTS = "300 1 60 1000"


def redis_dir(run_dir: Path) -> Path:
    return run_dir / "redis"


def redis_command(port: int, data_dir: Path) -> list[str]:
    return [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        # A SIGKILL can leave a half-written last command: load what precedes it.
        "--aof-load-truncated",
        "yes",
        "--save",
        SNAPSHOTS,
        "--dbfilename",
        "dump.rdb",
        "--daemonize",
        "no",
    ]


def broker_dir(run_dir: Path) -> Path:
    return run_dir / "broker"


# The bucket Tansu's s3 storage engine keeps the log in (s3://BUCKET/).
BROKER_BUCKET = "tansu"
# The store checks no credentials: it listens on loopback only, whatever KS_HOST says.
BROKER_STORE_HOST = "127.0.0.1"


def broker_store_command(port: int, data_dir: Path) -> list[str]:
    """The embedded broker's store (deploy/objectstore.py)."""
    return [
        sys.executable,
        "-m",
        "deploy.objectstore",
        "--root",
        str(data_dir),
        "--host",
        BROKER_STORE_HOST,
        "--port",
        str(port),
        "--bucket",
        BROKER_BUCKET,
    ]


def broker_store_env(port: int) -> dict[str, str]:
    """What Tansu's object_store client needs to use the store: its address over plain HTTP,
    a region, and credentials (any: the store checks none; without them the client would look
    for a cloud's instance metadata)."""
    return {
        "AWS_ENDPOINT": f"http://{BROKER_STORE_HOST}:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "knowstream",
        "AWS_SECRET_ACCESS_KEY": "knowstream",
    }


def redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def is_redis(pid: int) -> bool:
    """Whether ``pid`` is a redis-server: a recorded pid can belong to another process after a
    reboot."""
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").startswith("redis-server")
    except OSError:
        return False


def redis_config(url: str) -> dict[str, str]:
    """``dir``, ``appendonly``, ``save`` and ``process_id`` of the Redis at ``url``; empty
    where CONFIG is refused (a managed or locked-down server)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, decode_responses=True)
    try:
        config: dict[str, str] = {}
        for name in ("dir", "appendonly", "save"):
            config[name] = str(client.config_get(name).get(name, ""))
        config["process_id"] = str(client.info("server").get("process_id", ""))
        return config
    except redis.RedisError:
        return {}
    finally:
        client.close()


def answering_redis(url: str, data_dir: Path, external: bool) -> int | None:
    """For a Redis that answers at ``url``: its pid when it is the stack's own (its data in
    ``data_dir``), None when it is an external one used on purpose; refused otherwise."""
    config = redis_config(url)
    where = f"{host_of(url)}:{urlparse(url).port or 6379}"
    if config.get("dir") and Path(config["dir"]).resolve() == data_dir.resolve():
        print(f"redis: the stack's own on {where} (pid {config['process_id']}, in {data_dir})")
        return int(config["process_id"]) or None
    if not external:
        raise RuntimeError(
            f"{where} answers as a Redis that is not this stack's (data dir "
            f"{config.get('dir', 'unknown')}): set KS_REDIS_URL to use it on purpose, or "
            "name a free port in KS_REDIS_URL for the stack's own"
        )
    volatile = config.get("appendonly") == "no" and not config.get("save")
    print(
        f"redis: using the external one at {where} (KS_REDIS_URL); not started or stopped by "
        f"the stack{' (it keeps nothing on disk: a restart loses all state)' if volatile else ''}"
    )
    return None


def host_of(url: str) -> str:
    return urlparse(url).hostname or "127.0.0.1"


def data_paths(run_dir: Path, env: dict[str, str]) -> list[Path]:
    """What ``make clean-data`` removes: the stack's Redis data, the broker's log, adapters and
    trainer directory, only where they lie inside the run directory (a KS_ADAPTER_DIR or
    KS_TRAINER_DIR elsewhere is somebody's own data)."""
    run_dir = run_dir.resolve()
    paths = [redis_dir(run_dir), broker_dir(run_dir)]
    for name, default in (("KS_ADAPTER_DIR", "adapters"), ("KS_TRAINER_DIR", "trainer")):
        path = Path(env.get(name) or run_dir / default).resolve()
        if path != run_dir and path.is_relative_to(run_dir):
            paths.append(path)
    return paths


def clean_data(run_dir: Path, env: dict[str, str]) -> list[Path]:
    removed = []
    for path in data_paths(run_dir, env):
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
    return removed
