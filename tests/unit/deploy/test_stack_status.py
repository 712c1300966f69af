"""`knowstream status` shows why a service is not serving: the reason its stalled stream
published in Redis (gRPC health has a status and no reason)."""

import json
import time

import redis

from deploy.stack import Stack, print_status
from services.common.keys import stream_status_key


class FakeRedis:
    def __init__(self, hashes):
        self.hashes = hashes

    def hgetall(self, key):
        return self.hashes.get(key, {})

    def close(self):
        pass


def test_a_stalled_stream_s_reason_is_in_the_status(tmp_path, monkeypatch, capsys):
    stack = Stack(tmp_path, {"KS_REDIS_PREFIX": "st", "KS_EMBED_PORT": "51999"})
    embed = stack.settings.address(51999)
    now = int(time.time() * 1000)
    stalled = {"ok": False, "reason": "stalled: ks.chunks[1]: 40+ records waiting", "at_ms": now}
    old = {"ok": False, "reason": "a process that is gone", "at_ms": now - 600_000}
    hashes = {
        stream_status_key("st", embed): {
            b"chunk-stream@host:1": json.dumps(stalled).encode(),
            b"chunk-stream@host:2": json.dumps(old).encode(),
        },
        stream_status_key("st", stack.settings.address(stack.service_port("retrieve"))): {
            b"indexer@host:3": json.dumps({"ok": True, "reason": "", "at_ms": now}).encode()
        },
    }
    monkeypatch.setattr(redis.Redis, "from_url", staticmethod(lambda *a, **k: FakeRedis(hashes)))
    assert stack.stream_details() == {embed: "chunk-stream: " + stalled["reason"]}
    rows = [
        {"component": "embed", "address": embed, "state": "NOT_SERVING", "pid": "1"}
        | {"started_by": "stack", "detail": stack.stream_details()[embed]},
        {"component": "retrieve", "address": "x", "state": "SERVING", "pid": "2"}
        | {"started_by": "stack"},
    ]
    print_status(rows)
    out = capsys.readouterr().out
    assert "embed: chunk-stream: stalled: ks.chunks[1]: 40+ records waiting" in out


def test_no_redis_means_no_detail(tmp_path, monkeypatch):
    def down(*a, **k):
        raise redis.ConnectionError("down")

    monkeypatch.setattr(redis.Redis, "from_url", staticmethod(down))
    assert Stack(tmp_path, {}).stream_details() == {}
