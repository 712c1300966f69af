"""The embedded broker's cost of keeping its log on disk: the same producer and consumer against
a broker on memory storage and one on disk storage (deploy/objectstore.py), each started alone
through the Stack on free ports, interleaved ``--rounds`` times so this machine's drift hits both.

Per storage, medians over the rounds: seconds to produce ``--records`` records of ``--size``
bytes (acks=all, batched as ingest's producer batches), seconds to read them all back, and
milliseconds per single acknowledged send (a send waited for before the next, as a producer
that needs each ack does).

    .venv/bin/python -m bench.broker --json [--records 2000] [--size 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench.common import free_port, log
from deploy.stack import Stack

STORAGES = ("memory", "disk")
SINGLE_SENDS = 200


def start(storage: str, run_dir: str) -> Stack:
    env = {
        "KS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "KS_BROKER_STORE_PORT": str(free_port()),
        "KS_BROKER_STORAGE": storage,
        "KS_RUN_DIR": run_dir,
    }
    stack = Stack(run_dir, env)
    stack.start_broker()
    return stack


def one_round(bootstrap: str, topic: str, records: int, size: int) -> dict[str, float]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    value = b"x" * size
    started = time.perf_counter()
    sent = [producer.send(topic, value, key=str(i).encode()) for i in range(records)]
    producer.flush()
    for future in sent:
        future.get(30)
    produce_s = time.perf_counter() - started
    producer.close()
    single = KafkaProducer(bootstrap_servers=bootstrap, acks="all")  # no linger: the ack alone
    started = time.perf_counter()
    for i in range(SINGLE_SENDS):
        single.send(f"{topic}.single", value, key=str(i).encode()).get(30)
    single_ms = (time.perf_counter() - started) / SINGLE_SENDS * 1000
    single.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=10_000)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    started, read, last = time.perf_counter(), 0, time.perf_counter()
    for _ in consumer:
        read += 1
        last = time.perf_counter()
        if read == records:
            break
    consumer.close()
    if read != records:
        raise RuntimeError(f"read {read} of {records} records back")
    return {"produce_s": produce_s, "consume_s": last - started, "single_send_ms": single_ms}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.broker", description=__doc__)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2000, help="bytes per record")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures: dict[str, list[dict[str, float]]] = {s: [] for s in STORAGES}
    stacks = {s: start(s, tempfile.mkdtemp(prefix=f"ks-broker-{s}-")) for s in STORAGES}
    try:
        for r in range(args.rounds):
            for storage, stack in stacks.items():
                row = one_round(
                    stack.settings.kafka_bootstrap, f"bench.{r}", args.records, args.size
                )
                log(f"round {r} {storage}: {row}")
                figures[storage].append(row)
    finally:
        for stack in stacks.values():
            stack.down()
    result: dict[str, Any] = {"records": args.records, "size": args.size, "rounds": args.rounds}
    for storage, rows in figures.items():
        result[storage] = {
            name: round(statistics.median(row[name] for row in rows), 3) for name in rows[0]
        }
    result["disk_over_memory"] = {
        name: round(result["disk"][name] / result["memory"][name], 2) for name in result["memory"]
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
