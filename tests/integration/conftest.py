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
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common.auth import Role, Token, TokenSet, create_secret_file, new_token_set
from services.common.clients import sync_channel

# A reader that may also read documents of the "oncology" access group (test_auth.py).
GROUP_READER = "oncologist"


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
    labelled.write_text(json.dumps({k: pubmedqa[k] for k in list(pubmedqa)[:16]}), encoding="utf-8")
    env = {
        "KS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "KS_BROKER_STORE_PORT": str(free_port()),
        "KS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "KS_INGEST_PORT": str(free_port()),
        "KS_EMBED_PORT": str(free_port()),
        "KS_RETRIEVE_PORT": str(free_port()),
        "KS_INFER_PORT": str(free_port()),
        "KS_MONITOR_PORT": str(free_port()),
        "KS_TRAINER_PORT": str(free_port()),
        "KS_OPENAI_PORT": str(free_port()),
        "KS_TRITON_GRPC_PORT": str(free_port()),
        "KS_TRITON_HTTP_PORT": str(free_port()),
        "KS_TRITON_METRICS_PORT": str(free_port()),
        # Every service's /metrics on a free port (test_observability.py has Prometheus scrape
        # them); `make up`'s defaults (9101-9106) may be taken by a developer's stack.
        **{
            f"KS_{s}_METRICS_PORT": str(free_port())
            for s in ("INGEST", "EMBED", "RETRIEVE", "INFER", "MONITOR", "TRAINER")
        },
        "KS_PROMETHEUS_PORT": str(free_port()),
        "KS_PROMETHEUS_SCRAPE_S": "1",
        "KS_REDIS_PREFIX": "kstest",
        "KS_RUN_DIR": str(run_dir),
        # Auth on, as in `make up`: the stack writes tokens.json into its run directory and the
        # tests' clients present its admin token (KS_TOKEN from the developer's shell must not
        # leak in); test_auth.py presents the other tokens itself.
        "KS_AUTH": "on",
        "KS_AUTH_TOKENS_FILE": str(run_dir / "tokens.json"),
        "KS_TOKEN": "",
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
        # Domain passages of a retrain request's questions: a few too. The monitor's tests
        # raise retrain requests whose jobs train in the background: with the default 200
        # (42 here) each took 2-3 minutes of both cores, and test jobs queued behind them.
        "KS_TRAINER_MAX_DOCUMENTS": "4",
        "KS_TRAINER_SHADOW_SAMPLES": "3",
        # Manual unless a test turns it on: other tests own the rollout while they run.
        "KS_TRAINER_POLICY": "manual",
        # Retrain requests (the monitor's) train on the 16 labelled items in seconds; the
        # knowledge loop's own test asks for knowledge mode and sizes it itself.
        "KS_TRAINER_MODE": "labelled",
        "KS_TRAINER_RETENTION_GENERAL_CHARS": "6000",
        # Prompts of 3/4 of the default context: prefill is most of an answer's time on 2
        # cores, and three 200-token chunks (the most a test retrieves) still fit whole.
        "KS_INFER_MAX_CONTEXT_CHARS": "3000",
    }
    # The token set the stack would generate, plus a reader with an access group.
    tokens = new_token_set().tokens
    extra = Token(
        GROUP_READER, Role.READER, "ks_oncologist_" + os.urandom(16).hex(), frozenset({"oncology"})
    )
    assert create_secret_file(run_dir / "tokens.json", TokenSet([*tokens, extra]).to_json())
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


def delete_documents(settings, ids, timeout_s: float = 180) -> None:
    """Deletes a test's documents from the shared stack and waits until none is searchable:
    copies of PubMedQA abstracts left behind would be retrieved (and cited, and trained on) in
    place of the originals by later modules."""
    ids = sorted(set(ids))
    ingest = ingest_pb2_grpc.IngestServiceStub(sync_channel(settings.endpoint("ingest")))
    retrieve = retrieve_pb2_grpc.RetrieveServiceStub(sync_channel(settings.endpoint("retrieve")))
    for doc_id in ids:
        ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(id=doc_id), timeout=10)

    def gone() -> bool:
        for start in range(0, len(ids), 20):
            # Hybrid (the default mode): gone from the dense index as well as from BM25.
            request = retrieve_pb2.SearchRequest(
                query="document",
                k=100,
                filters=retrieve_pb2.SearchFilters(doc_ids=ids[start : start + 20]),
            )
            if retrieve.Search(request, timeout=15).hits:
                return False
        return True

    wait_for(gone, timeout_s, f"{len(ids)} deleted documents to leave the index", 2)


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
