"""The consumer plumbing without a broker: poison records are isolated, a dependency that is
down is waited for, a reset log is read again, and a stalled partition fails readiness."""

import asyncio

import redis.exceptions
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError, UnknownError
from aiokafka.structs import ConsumerRecord

from knowstream.events.v1 import events_pb2
from services.common.consumer import StreamConsumer, is_transient
from services.common.kafka import BadEvent
from services.common.logprobe import Fingerprint, Probe
from services.common.partitions import PartitionTracker
from services.common.settings import CommonSettings
from services.common.streams import StreamApp, attach, dead_letter

TOPIC = "t"
TP = TopicPartition(TOPIC, 0)


def record(offset: int, value: bytes, partition: int = 0) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, partition, offset, 1000 + offset, 0, b"k", value, None, 1, 1, [])


class FakeProducer:
    def __init__(self):
        self.sent = []

    async def send_and_wait(self, topic, value, key=None, headers=None):
        self.sent.append((topic, events_pb2.DeadLetter.FromString(value)))


class FakeConsumer:
    def __init__(self, *tps):
        self.assigned = set(tps)
        self.seeks, self.to_beginning, self.commits = [], [], []

    def assignment(self):
        return set(self.assigned)

    def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    async def seek_to_beginning(self, *tps):
        self.to_beginning.extend(tps)

    async def committed(self, tp):
        return 7

    async def commit(self, offsets):
        self.commits.append(offsets)


class FakeProbe:
    def __init__(self, verdict):
        self.verdict = verdict
        self.asked = []

    async def check(self, tp, fp):
        self.asked.append((tp, fp))
        return self.verdict


def settings(**kw) -> CommonSettings:
    return CommonSettings(stream_retries=2, stream_retry_backoff_s=0.001, **kw)


async def make(handler, **kw) -> tuple[StreamConsumer, FakeProducer]:
    """In a coroutine: aiokafka's clients are made inside a running loop."""
    producer = FakeProducer()
    stream = StreamConsumer(settings(), "svc", "g", {TOPIC: handler}, producer=producer, **kw)
    stream.consumer = stream.guard.consumer = FakeConsumer(TP)
    return stream, producer


def test_a_poison_record_is_dead_lettered_and_the_rest_are_handled():
    handled = []
    calls = 0

    async def handler(records):
        nonlocal calls
        calls += 1
        for r in records:
            if r.value == b"poison":
                raise ValueError("cannot digest")
            handled.append(r.offset)

    async def main():
        stream, producer = await make(handler)
        batch = [record(i, b"poison" if i == 2 else b"ok") for i in range(5)]
        await stream._process(TOPIC, batch)
        return producer

    producer = asyncio.run(main())
    assert set(handled) == {0, 1, 3, 4}
    (topic, letter), *rest = producer.sent
    assert not rest and topic == "t.dlq" and letter.source_offset == 2
    assert "failed 3 times" in letter.reason and "cannot digest" in letter.reason


def test_a_dependency_that_is_down_is_retried_not_dead_lettered():
    failures = iter([redis.exceptions.ConnectionError("down")] * 5)
    handled = []

    async def handler(records):
        if (exc := next(failures, None)) is not None:
            raise exc
        handled.extend(r.offset for r in records)

    async def main():
        stream, producer = await make(handler)
        await stream._process(TOPIC, [record(0, b"a"), record(1, b"b")])
        return producer

    producer = asyncio.run(main())
    assert handled == [0, 1] and producer.sent == []
    assert is_transient(redis.exceptions.BusyLoadingError()) and not is_transient(ValueError())
    # A broker failing under a send is not the record's fault; a record too large is.
    assert is_transient(UnknownError()) and not is_transient(MessageSizeTooLargeError())


def test_rejects_go_to_the_dead_letter_topic_and_offsets_are_committed():
    async def handler(records):
        return [(records[1], "bad record")]

    async def main():
        stream, producer = await make(handler)
        stream.tracker.assigned(TP, 0)
        batch = [record(0, b"a"), record(1, b"b")]
        await stream._process(TOPIC, batch)
        await stream._commit({TP: batch})
        return stream, producer

    stream, producer = asyncio.run(main())
    assert [letter.reason for _, letter in producer.sent] == ["bad record"]
    assert stream.consumer.commits == [{TP: 2}]
    assert stream.tracker.fingerprints[TP] == Fingerprint(1, 1001)


class FakePositions:
    def __init__(self, stored):
        self.stored = stored
        self.reset_ = []

    async def load(self, partitions):
        return {tp: self.stored[tp.partition] for tp in partitions if tp.partition in self.stored}

    async def reset(self, tp):
        self.reset_.append(tp)


def test_a_reset_log_is_read_again_from_the_start():
    async def handler(records):
        return None

    positions = FakePositions({0: 525})

    async def main():
        stream, _ = await make(handler, positions=positions)
        stream.guard.probe = FakeProbe(Probe.GONE)
        await stream.guard.assigned({TP})
        return stream

    stream = asyncio.run(main())
    # Positioned at the stored offset, then found that offset's record gone: from the start.
    assert stream.consumer.seeks == [(TP, 525)]
    assert stream.consumer.to_beginning == [TP] and positions.reset_ == [TP]
    assert stream.guard.probe.asked == [(TP, Fingerprint(524))]
    assert stream.tracker.parts[TP].next_offset == 0


def test_an_intact_log_keeps_its_position_and_is_checked_by_fingerprint():
    async def handler(records):
        return None

    async def main():
        stream, _ = await make(handler)
        stream.guard.probe = FakeProbe(Probe.INTACT)
        stream.tracker.fingerprints[TP] = Fingerprint(6, 1006)
        await stream.guard.assigned({TP})
        return stream

    stream = asyncio.run(main())
    assert stream.consumer.to_beginning == []
    assert stream.guard.probe.asked == [(TP, Fingerprint(6, 1006))]
    assert stream.tracker.parts[TP].next_offset == 7


def test_a_partition_with_records_waiting_and_no_progress_is_stalled():
    now = [0.0]
    tracker = PartitionTracker(stall_s=60, clock=lambda: now[0])
    tracker.assigned(TP, 10)
    assert tracker.observe_end(TP, 10).lag == 0
    now[0] = 100
    tracker.observe_end(TP, 50)  # records start to wait
    now[0] = 150
    assert not tracker.observe_end(TP, 50).stalled
    tracker.processed(TP, 20, 1)  # progress: not stalled however long the backlog
    now[0] = 200
    assert not tracker.observe_end(TP, 80).stalled and tracker.status().ok
    tracker.last_error = "ConnectionError: down"
    now[0] = 300
    state = tracker.observe_end(TP, 80)
    status = tracker.status()
    assert state.stalled and not status.ok
    assert "t[0]: 59+ records waiting" in status.reason and "ConnectionError" in status.reason
    tracker.processed(TP, 79, 2)
    assert not tracker.observe_end(TP, 80).stalled and tracker.status().ok


class FakeGrpcApp:
    name = "trainer"
    address = "127.0.0.1:1"

    def __init__(self):
        self.checks, self.starts, self.stops = [], [], []

    def on_start(self, hook):
        self.starts.append(hook)

    def on_stop(self, hook):
        self.stops.append(hook)

    def add_check(self, name, check):
        self.checks.append(name)

    def spawn(self, coro, name):
        coro.close()


def test_faust_style_agents_run_unchanged_and_a_crashing_record_is_set_aside():
    """The trainer's agents are written for faust: an async for over stream.events(), bad
    events dead-lettered with dead_letter(), other errors raised."""
    seen = []

    async def agent(stream):
        async for event in stream.events():
            message = event.message
            if message.value == b"bad":
                await (await dead_letter(dlq, message, "bad event", "trainer"))
            elif message.value == b"crash":
                raise RuntimeError("bug")
            else:
                seen.append(message.offset)

    grpc_app = FakeGrpcApp()

    async def main():
        nonlocal dlq
        app = StreamApp(settings(), "grp")
        app.producer = FakeProducer()
        dlq = app.topic("t.dlq")
        app.agent(app.topic(TOPIC), name="a")(agent)
        attach(grpc_app, app, None, "trainer-stream")
        handler = app.handlers()[TOPIC]
        stream = StreamConsumer(
            settings(), "trainer", "grp", {TOPIC: handler}, producer=app.producer
        )
        stream.consumer = stream.guard.consumer = FakeConsumer(TP)
        values = [b"ok", b"bad", b"crash", b"ok"]
        await stream._process(TOPIC, [record(i, v) for i, v in enumerate(values)])
        for agent_ in app.agents.values():
            await agent_.stop()
        return app

    dlq = None
    app = asyncio.run(main())
    assert seen[0] == 0 and seen[-1] == 3
    reasons = sorted(letter.reason for _, letter in app.producer.sent)
    assert reasons[0] == "bad event" and "RuntimeError: bug" in reasons[-1]
    assert grpc_app.checks == ["trainer-stream"]


def test_bad_event_is_still_a_value_error():
    assert issubclass(BadEvent, ValueError)
