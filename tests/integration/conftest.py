"""Integration fixtures: a whole stack (Tansu broker, its own Redis, every service) on free
ports in a temporary run directory, so the tests never touch a developer's `make up` stack."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from google.protobuf.message import DecodeError
from kafka import KafkaConsumer

from deploy.stack import Stack
from knowstream.events.v1 import events_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def stack(tmp_path_factory, pubmedqa):
    run_dir = tmp_path_factory.mktemp("stack")
    # The trainer's labelled data in the tests: 16 PubMedQA items, so every job (those the
    # monitor's retrain requests start included) trains in seconds.
    labelled = run_dir / "labelled.json"
    labelled.write_text(json.dumps({k: pubmedqa[k] for k in list(pubmedqa)[:16]}))
    env = {
        "KS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "KS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "KS_INGEST_PORT": str(free_port()),
        "KS_EMBED_PORT": str(free_port()),
        "KS_RETRIEVE_PORT": str(free_port()),
        "KS_INFER_PORT": str(free_port()),
        "KS_MONITOR_PORT": str(free_port()),
        "KS_TRAINER_PORT": str(free_port()),
        "KS_TRITON_GRPC_PORT": str(free_port()),
        "KS_TRITON_HTTP_PORT": str(free_port()),
        "KS_TRITON_METRICS_PORT": str(free_port()),
        "KS_REDIS_PREFIX": "kstest",
        "KS_RUN_DIR": str(run_dir),
        "KS_LOG_LEVEL": "INFO",
        "KS_TRAINER_LABELLED_DATA": str(labelled),
        "KS_TRAINER_MAX_TOKENS": "192",
        "KS_TRAINER_MICRO_BATCH": "2",
        "KS_TRAINER_GRAD_ACCUM": "1",
        "KS_TRAINER_GENERAL_TOKENS": "1024",
        "KS_TRAINER_GATE_MIN_EVAL_ITEMS": "1",
        # A few steps on 13 items cannot be expected to beat live on 3 eval items: the tests
        # check the gate's mechanics (a request's own thresholds make it fail on purpose).
        "KS_TRAINER_GATE_MIN_GAIN": "-1",
        "KS_TRAINER_GATE_MAX_FORGETTING_PCT": "50",
        "KS_TRAINER_CHECKPOINT_EVERY": "1",
        # Recently ingested documents (other tests ingest many): a few per job.
        "KS_TRAINER_MAX_RECENT_DOCUMENTS": "3",
        "KS_TRAINER_SHADOW_SAMPLES": "3",
        # Manual unless a test turns it on: other tests own the rollout while they run.
        "KS_TRAINER_POLICY": "manual",
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


def read_dead_letters(settings, topic: str, count: int, timeout_ms: int = 15_000) -> list:
    """The first ``count`` DeadLetter records of ``topic``'s dead-letter topic."""
    consumer = KafkaConsumer(
        settings.dlq(topic),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=timeout_ms,
        enable_auto_commit=False,
        group_id=None,
    )
    letters = []
    try:
        for message in consumer:
            letters.append(events_pb2.DeadLetter.FromString(message.value))
            if len(letters) >= count:
                break
    finally:
        consumer.close()
    assert len(letters) == count, f"expected {count} dead letters on {topic}, got {letters}"
    return letters


def read_events(settings, topic: str, cls, match, timeout_s: float = 30):
    """The first record of ``topic`` (parsed as ``cls``) that ``match`` accepts."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
        enable_auto_commit=False,
        group_id=None,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for message in consumer:
                try:
                    event = cls.FromString(message.value)
                except DecodeError:
                    continue  # the dead-letter tests put garbage on these topics on purpose
                if match(event):
                    return event
    finally:
        consumer.close()
    raise AssertionError(f"no matching {cls.__name__} on {topic} within {timeout_s}s")
