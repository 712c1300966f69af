"""The embedded broker keeps its log on disk (deploy/objectstore.py): after a SIGKILL of the
broker, or of its store, every record it acknowledged and every committed offset is still there,
and new records follow the old ones instead of overwriting them. Starts the broker alone,
through the same Stack code path as `make up`."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from deploy.stack import Stack
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
TOPIC = "ks.durable.test"


@pytest.fixture
def stack(tmp_path: Path):
    env = {
        "KS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "KS_BROKER_STORE_PORT": str(free_port()),
        "KS_RUN_DIR": str(tmp_path),
    }
    stack = Stack(tmp_path, env)
    stack.start_broker()
    yield stack
    stack.down()


def produce(stack: Stack, tag: str, n: int) -> None:
    producer = KafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, acks="all")
    try:
        for i in range(n):
            producer.send(TOPIC, f"{tag}-{i}".encode(), key=str(i).encode()).get(30)
    finally:
        producer.close()


def read_all(stack: Stack) -> list[str]:
    consumer = KafkaConsumer(
        bootstrap_servers=stack.settings.kafka_bootstrap, consumer_timeout_ms=5000
    )
    try:
        partitions = [
            TopicPartition(TOPIC, p) for p in sorted(consumer.partitions_for_topic(TOPIC))
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        return [m.value.decode() for m in consumer]
    finally:
        consumer.close()


def committed(stack: Stack, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, group_id=group)
    try:
        return {p: consumer.committed(TopicPartition(TOPIC, p)) for p in range(4)}
    finally:
        consumer.close()


def test_a_killed_broker_comes_back_with_its_records_and_offsets(stack: Stack) -> None:
    assert (stack.run_dir / "broker").is_dir()
    produce(stack, "before", 30)
    consumer = KafkaConsumer(
        bootstrap_servers=stack.settings.kafka_bootstrap, group_id="g", enable_auto_commit=False
    )
    consumer.commit({TopicPartition(TOPIC, p): OffsetAndMetadata(p + 1, "", -1) for p in range(4)})
    consumer.close()
    for _ in range(2):  # a second restart must not rewrite what the first one kept
        stack.stop("broker", signal.SIGKILL)
        stack.start_broker()
    produce(stack, "after", 10)
    records = read_all(stack)
    expected = {f"before-{i}" for i in range(30)} | {f"after-{i}" for i in range(10)}
    assert sorted(records) == sorted(expected)
    assert committed(stack, "g") == {p: p + 1 for p in range(4)}


def test_a_killed_store_loses_nothing_acknowledged(stack: Stack) -> None:
    produce(stack, "before", 20)
    stack.stop("broker-store", signal.SIGKILL)
    stack.start_broker_store()
    produce(stack, "after", 5)
    assert sorted(read_all(stack)) == sorted(
        {f"before-{i}" for i in range(20)} | {f"after-{i}" for i in range(5)}
    )
