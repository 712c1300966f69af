"""A record that can never be sent (too large for the producer or the broker) goes to its
topic's dead-letter topic with the reason, and the records queued behind it still go out."""

from __future__ import annotations

import asyncio

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from knowstream.events.v1 import events_pb2
from services.common.kafka import DEAD_LETTER_KEPT_BYTES
from services.common.publisher import EventPublisher
from services.common.settings import CommonSettings

LIMIT = 1 << 20


class FakeProducer:
    """Refuses values over LIMIT itself, like aiokafka's max_request_size check; a "broker"
    refuses values starting with b"B" once sent."""

    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []
        self.letters: list[tuple[str, events_pb2.DeadLetter]] = []
        self.attempts = 0

    async def send(self, topic, value, key=None, headers=None):
        self.attempts += 1
        if len(value) > LIMIT:
            raise MessageSizeTooLargeError(f"The message is {len(value)} bytes")
        delivery = asyncio.get_running_loop().create_future()
        if value.startswith(b"B"):
            delivery.set_exception(RecordTooLargeError("broker refused"))
        else:
            self.sent.append((topic, value))
            delivery.set_result(None)
        return delivery

    async def send_and_wait(self, topic, value, key=None, headers=None):
        self.letters.append((topic, events_pb2.DeadLetter.FromString(value)))

    async def flush(self):
        pass


class Raw:
    def __init__(self, value: bytes):
        self.value = value
        self.header = events_pb2.EventHeader()

    def SerializeToString(self) -> bytes:
        return self.value


def test_an_unsendable_record_is_dead_lettered_and_the_queue_moves_on():
    producer = FakeProducer()
    settings = CommonSettings(kafka_max_record_bytes=LIMIT, grpc_max_message_bytes=LIMIT)
    publisher = EventPublisher(producer, settings, "infer", retry_s=0.01)  # type: ignore[arg-type]
    huge = b"x" * (LIMIT + 1)

    async def scenario() -> None:
        task = asyncio.ensure_future(publisher.run())
        publisher.publish("ks.inference", "k1", Raw(huge))
        publisher.publish("ks.inference", "k2", Raw(b"B-refused-by-the-broker"))
        publisher.publish("ks.inference", "k3", Raw(b"small"))
        await asyncio.wait_for(publisher.queue.join(), 5)
        await publisher.drain(1)
        task.cancel()

    asyncio.run(scenario())
    assert producer.sent == [("ks.inference", b"small")]
    assert producer.attempts == 3  # each tried once: no retry loop on a permanent failure
    (dlq, first), (_, second) = producer.letters
    assert dlq == "ks.inference.dlq" and first.source_topic == "ks.inference"
    assert f"record of {len(huge)} bytes can never be sent" in first.reason
    assert "MessageSizeTooLargeError" in first.reason and "cut to its first" in first.reason
    assert len(first.value) == DEAD_LETTER_KEPT_BYTES and first.key == b"k1"
    assert "RecordTooLargeError" in second.reason and second.value == b"B-refused-by-the-broker"


def test_a_transient_failure_is_still_retried():
    producer = FakeProducer()
    failures = [ConnectionError("broker down")]
    send = producer.send

    async def flaky(topic, value, key=None, headers=None):
        if failures:
            raise failures.pop()
        return await send(topic, value, key, headers)

    producer.send = flaky  # type: ignore[method-assign]
    publisher = EventPublisher(producer, CommonSettings(), "infer", retry_s=0.01)  # type: ignore[arg-type]

    async def scenario() -> None:
        task = asyncio.ensure_future(publisher.run())
        publisher.publish("ks.feedback", "k", Raw(b"ok"))
        await asyncio.wait_for(publisher.queue.join(), 5)
        task.cancel()

    asyncio.run(scenario())
    assert producer.sent == [("ks.feedback", b"ok")] and not producer.letters
