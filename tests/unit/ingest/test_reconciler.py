"""The outbox's reconciler against an in-memory registry and log: what it publishes again,
when, and what it leaves alone."""

import asyncio
import time

from services.common.kafka import now_ms
from services.common.keys import log_resets_key
from services.ingest.chunking import Chunker
from services.ingest.pipeline import IngestPipeline, RawInput
from services.ingest.reconciler import Reconciler
from services.ingest.settings import IngestSettings
from tests.unit.ingest.fakes import FakeLog, FakeRegistry


class FakeRedis:
    def __init__(self):
        self.hashes: dict[str, dict[str, bytes]] = {}

    async def hmget(self, key, fields):
        return [self.hashes.get(key, {}).get(f) for f in fields]


def setup(tokenizer, **settings):
    s = IngestSettings(ingest_check_after_s=settings.get("check_after_s", 60), redis_prefix="t")
    log, registry, redis = FakeLog(), FakeRegistry(), FakeRedis()
    pipeline = IngestPipeline(
        Chunker(tokenizer, 32, 4), registry, log.publish, s.topic_chunks, 10_000, 60
    )
    reconciler = Reconciler(s, pipeline, registry, log, redis)
    reconciler.grace_s = settings.get("grace_s", 0)
    return s, log, registry, redis, pipeline, reconciler


def run(coro):
    return asyncio.run(coro)


def ingest(pipeline, n):
    docs = [RawInput(f"d{i}", "", f"Document number {i}. " * 5) for i in range(n)]
    return run(pipeline.ingest(docs))


def make_due(registry):
    for doc_id in registry.due_at:
        registry.due_at[doc_id] = 0


def test_nothing_is_published_again_before_it_is_due(tokenizer):
    _, log, _, _, pipeline, reconciler = setup(tokenizer)
    ingest(pipeline, 3)
    calls = log.calls
    done = run(reconciler.round())
    assert (done.republished, log.calls) == (0, calls)


def test_due_versions_still_in_the_log_wait_and_lost_ones_go_again(tokenizer):
    _, log, registry, _, pipeline, reconciler = setup(tokenizer)
    ingest(pipeline, 3)
    make_due(registry)
    done = run(reconciler.round())
    assert (done.republished, done.waiting) == (0, 3)  # behind a backlog, not lost
    assert all(at > now_ms() for at in registry.due_at.values())
    log.lose_everything()
    make_due(registry)
    done = run(reconciler.round())
    assert done.republished == 3
    assert all(registry.docs[f"d{i}"]["attempts"] == 2 for i in range(3))


def test_applied_versions_and_deletions_leave_the_outbox(tokenizer):
    _, _, registry, _, pipeline, reconciler = setup(tokenizer)
    results = ingest(pipeline, 2)
    run(pipeline.delete("d1"))
    registry.active["d0"] = results[0].content_hash
    make_due(registry)
    done = run(reconciler.round())
    assert done.settled == 2 and registry.due_at == {}
    assert "d1" not in registry.docs and run(registry.get("d0")) is not None


def test_a_log_reset_publishes_everything_unapplied_at_once(tokenizer):
    s, log, registry, redis, pipeline, reconciler = setup(tokenizer)
    results = ingest(pipeline, 4)
    registry.active["d0"] = results[0].content_hash
    redis.hashes[log_resets_key("t")] = {s.topic_chunks: str(now_ms() + 1).encode()}
    time.sleep(0.01)  # the mark is in the past
    calls = log.calls
    done = run(reconciler.round())  # nothing is due yet: the reset alone decides
    assert (done.republished, done.settled) == (3, 1)
    assert log.calls == calls + 3
    again = run(reconciler.round())  # the same reset is acted on once
    assert again.republished == 0


def test_reingesting_an_unindexed_document_after_a_loss_publishes_it(tokenizer):
    _, log, _, _, pipeline, _ = setup(tokenizer)
    ingest(pipeline, 2)
    log.lose_everything()
    results = ingest(pipeline, 2)
    assert [r.status for r in results] == [1, 1]  # ACCEPTED, not UNCHANGED


def test_republishing_after_a_reset_waits_until_consumers_have_seen_it(tokenizer):
    s, log, registry, redis, pipeline, reconciler = setup(tokenizer, grace_s=30)
    ingest(pipeline, 2)
    redis.hashes[log_resets_key("t")] = {s.topic_embedded: str(now_ms() + 1).encode()}
    assert run(reconciler.round()).republished == 0  # within the grace period
    log.lose_everything()
    make_due(registry)
    assert run(reconciler.round()).republished == 0  # gone, but still settling
    reconciler.grace_s = 0
    time.sleep(0.01)  # the mark (1 ms ahead) is in the past: within it, it still settles
    assert run(reconciler.round()).republished == 2


def test_reset_marks_that_keep_coming_hold_republishing_for_two_grace_periods_at_most(tokenizer):
    s, log, _, redis, pipeline, reconciler = setup(tokenizer, grace_s=0.2)
    ingest(pipeline, 2)
    log.lose_everything()
    started, republished = time.monotonic(), 0
    while not republished and time.monotonic() - started < 2:
        # A fresh mark every round: on its own, each would start another grace period.
        redis.hashes[log_resets_key("t")] = {s.topic_embedded: str(now_ms()).encode()}
        republished = run(reconciler.round()).republished
        time.sleep(0.02)
    assert republished == 2
    assert 0.2 <= time.monotonic() - started < 0.6
