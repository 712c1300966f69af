"""Chaos under load: while documents stream in through gRPC and the raw topic (and, with
serving components, Ask calls go on), SIGKILL the broker, its store, Redis, embed, retrieve
and ingest — and with ``--full`` also infer, Triton, the monitor and the trainer — in turn,
start each again through the Stack API, and count what the documents went through. One row per
component:

* ``acknowledged``: documents whose IngestDocuments call returned (from the previous kill on);
* ``indexed``: of those, how many are searchable with all their chunks at the end (after the
  load stopped and the path drained its backlog);
* ``lost``: acknowledged and not searchable at the end;
* ``duplicated``: documents with a chunk more than once, or with chunks of another version;
* ``recover_s``: seconds from the kill until every document acknowledged so far (under the
  continuing load) is searchable; on a CPU near its embedding capacity this is mostly the time
  to work off the backlog built while the component was down;
* ``restart_s``: seconds from the kill until the component answers again (a port open,
  Triton ready, a service SERVING): for Triton, its start and model load under the load;
* ``ask_recover_s`` (serving stacks): seconds from the kill until an Ask (no retrieval, one
  token) answers again, asked from the kill on;
* ``state_kept``: the monitor's windows and the trainer's jobs after the restart are a
  superset of those before it (None when that component holds none);
* ``raw_acknowledged`` / ``raw_indexed`` / ``raw_lost``: the same for documents a plain Kafka
  producer wrote to the raw topic at the same rate, acknowledged by the broker (acks=all). The
  broker is their only copy until ingest has read them: its log on disk (the default,
  ``KS_BROKER_STORAGE=disk``) keeps them; with ``KS_BROKER_STORAGE=memory`` a record
  acknowledged and not yet read when the broker dies is lost by construction, so that broker
  row's raw losses are reported, not failed on.

By default it runs on its own stack (broker, Redis, embed, retrieve, ingest on free ports in a
temporary run directory), so it never touches a developer's ``make up``; ``--running`` uses
that one instead (the ``KS_*`` environment and ``.run/``).

    .venv/bin/python -m bench.chaos --json [--rate 2] [--components broker,redis,...]

Over 400 lines because the loads, the kills and the accounting are one experiment, and the
tests' short form (tests/integration/test_chaos.py) runs the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import grpc
from kafka import KafkaProducer
from kafka.errors import KafkaError

from bench.common import DEFAULT_DATA, chunk_hits, free_port, load_pubmedqa
from deploy.stack import Stack
from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.clients import sync_channel
from services.common.settings import CommonSettings

COMPONENTS = ("broker", "broker-store", "redis", "embed", "retrieve", "ingest")
SERVING = ("infer", "triton", "monitor", "trainer")
KNOWLEDGE_PATH = ["embed", "retrieve", "ingest"]


@dataclass
class Row:
    component: str
    acknowledged: int = 0
    indexed: int = 0
    lost: int = 0
    duplicated: int = 0
    recover_s: float | None = None
    restart_s: float | None = None
    failed_calls: int = 0  # ingest calls that errored (not acknowledged: the client retries)
    ask_recover_s: float | None = None
    state_kept: bool | None = None
    lost_ids: list[str] = field(default_factory=list)  # the first 10, to look them up
    raw_acknowledged: int = 0
    raw_indexed: int = 0
    raw_lost: int = 0
    raw_duplicated: int = 0


class Load:
    """Ingests one PubMedQA document per call at ``rate`` calls per second, in a thread, and
    records every acknowledged one (id -> chunk count)."""

    def __init__(self, stack: Stack, texts: list[str], rate: float, tag: str):
        self.stack = stack
        self.texts = texts
        self.rate = rate
        self.tag = tag
        self.acked: dict[str, int] = {}
        self.order: list[str] = []
        # Every id sent, acknowledged or not: a call that failed on the client's side (a
        # deadline during a broker kill) may still have been accepted and indexed later.
        self.attempted: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        if self.rate > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (a rate of 0 starts none)
            self._thread.join(timeout=60)

    def _stub(self) -> ingest_pb2_grpc.IngestServiceStub:
        address = self.stack.settings.address(self.stack.settings.ingest_port)
        return ingest_pb2_grpc.IngestServiceStub(sync_channel(address))

    def _run(self) -> None:
        stub, i = self._stub(), 0
        while not self._stop.is_set():
            started = time.monotonic()
            doc = ingest_pb2.Document(
                id=f"{self.tag}-{i}",
                # A unique first line: new content every time, of a realistic size.
                text=f"Chaos run {self.tag}, document {i}.\n{self.texts[i % len(self.texts)]}",
                metadata=events_pb2.DocumentMetadata(source="bench-chaos"),
            )
            with self._lock:
                self.attempted.append(doc.id)
            try:
                reply = stub.IngestDocuments(
                    ingest_pb2.IngestDocumentsRequest(documents=[doc]), timeout=10
                )
                if reply.accepted == 1:
                    with self._lock:
                        self.acked[doc.id] = reply.results[0].chunk_count
                        self.order.append(doc.id)
                    i += 1
            except grpc.RpcError:
                with self._lock:
                    self.failed += 1
                i += 1  # not acknowledged: a client would retry; this one moves on
            self._stop.wait(max(0.0, 1 / self.rate - (time.monotonic() - started)))

    def sent(self) -> list[str]:
        with self._lock:
            return list(self.attempted)

    def snapshot(self) -> tuple[list[str], int]:
        with self._lock:
            return list(self.order), self.failed

    def expected(self) -> dict[str, int]:
        """Acknowledged documents -> their chunk count (those whose count is known)."""
        with self._lock:
            return {d: self.acked[d] for d in self.order if self.acked[d] > 0}


class RawLoad(Load):
    """Writes one JSON document per record to the raw topic at ``rate`` per second, as an
    outside producer would; a record the broker acknowledged (acks=all) is acknowledged. Its
    chunk count is the one ingest recorded when it read it (GetDocument); until then, or for
    ever if the record was lost, it is unknown and the document not indexed."""

    def _run(self) -> None:
        s = self.stack.settings
        producer = KafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, acks="all", retries=0, request_timeout_ms=5000
        )
        i = 0
        while not self._stop.is_set():
            started = time.monotonic()
            doc_id = f"{self.tag}-raw-{i}"
            text = f"Chaos run {self.tag}, raw document {i}.\n{self.texts[i % len(self.texts)]}"
            value = json.dumps({"id": doc_id, "text": text, "source": "bench-chaos"}).encode()
            with self._lock:
                self.attempted.append(doc_id)
            try:
                producer.send(s.topic_raw_documents, value, key=doc_id.encode()).get(10)
                with self._lock:
                    self.acked[doc_id] = 0  # known once ingest has read it
                    self.order.append(doc_id)
            except KafkaError:
                with self._lock:
                    self.failed += 1
            i += 1
            self._stop.wait(max(0.0, 1 / self.rate - (time.monotonic() - started)))
        producer.close(timeout=5)

    def expected(self) -> dict[str, int]:
        with self._lock:
            unknown = [d for d, n in self.acked.items() if n == 0]
        if unknown:
            ingest = self._stub()  # one channel per poll, as Load's calls use
            for doc_id in unknown:
                try:
                    info = ingest.GetDocument(ingest_pb2.GetDocumentRequest(id=doc_id), timeout=5)
                except grpc.RpcError:
                    continue  # not read yet, lost, or ingest is down right now
                with self._lock:
                    self.acked[doc_id] = info.chunk_count
        return super().expected()


def index_state(stack: Stack, expected: dict[str, int]) -> tuple[set[str], set[str]]:
    """(indexed, duplicated): documents searchable with exactly their chunks, and documents
    with a chunk twice or chunks beyond their count (another version's)."""
    address = stack.settings.address(stack.settings.retrieve_port)
    retrieve = retrieve_pb2_grpc.RetrieveServiceStub(sync_channel(address))
    indexed, duplicated = set(), set()
    for doc_id, found in chunk_hits(retrieve, sorted(expected)).items():
        if len(found) != len(set(found)) or len(set(found)) > expected[doc_id]:
            duplicated.add(doc_id)
        elif len(found) == expected[doc_id]:
            indexed.add(doc_id)
    return indexed, duplicated


def restart(stack: Stack, component: str, timeout_s: float = 180) -> None:
    if component == "broker":
        stack.start_broker()
        stack.create_topics()
    elif component == "broker-store":
        stack.start_broker_store()  # the broker retries its store on its own
    elif component == "redis":
        stack.start_redis()
    elif component == "triton":
        stack.start_triton()  # infer finds it again on its own (its health follows Triton's)
    else:
        stack.start_service(component)
        stack.wait_serving([component], timeout_s)


def ask_answers(stack: Stack) -> bool:
    """One short Ask (no retrieval, one token): does the serving path answer?"""
    infer = infer_pb2_grpc.InferServiceStub(sync_channel(stack.settings.endpoint("infer")))
    try:
        infer.Ask(
            infer_pb2.AskRequest(
                question="Is this a chaos probe?", no_retrieval=True, max_tokens=1
            ),
            timeout=5,
        )
        return True
    except grpc.RpcError:
        return False


class AskProbe:
    """Asks from the kill on, in a thread, until an Ask answers: the seconds that took. Started
    before the restart, so that a kill Ask does not depend on (ingest, the monitor...) reads
    as the moment it answered, not as the time the killed component took to restart."""

    def __init__(self, stack: Stack, since: float, timeout_s: float):
        self.stack, self.since, self.timeout_s = stack, since, timeout_s
        self.answered_s: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while time.monotonic() < self.since + self.timeout_s:
            if ask_answers(self.stack):
                self.answered_s = round(time.monotonic() - self.since, 1)
                return
            time.sleep(0.25)

    def result(self) -> float | None:
        self._thread.join(max(0.0, self.since + self.timeout_s - time.monotonic()) + 6)
        return self.answered_s


@dataclass(frozen=True)
class Held:
    """What a component keeps that a restart must not lose: window indices and the count of
    questions seen (monitor), or job ids (trainer, count 0)."""

    ids: frozenset[str]
    count: int = 0

    def kept_in(self, after: Held | None) -> bool:
        return after is not None and self.ids <= after.ids and after.count >= self.count


def held_state(stack: Stack, component: str) -> Held | None:
    """None for components that hold nothing of the kind, or when it cannot be read."""
    try:
        if component == "monitor":
            monitor = monitor_pb2_grpc.MonitorServiceStub(
                sync_channel(stack.settings.endpoint("monitor"))
            )
            status = monitor.GetDriftStatus(
                monitor_pb2.GetDriftStatusRequest(windows=50), timeout=10
            )
            return Held(frozenset(str(w.index) for w in status.windows), status.questions_seen)
        if component == "trainer":
            trainer = trainer_pb2_grpc.TrainerServiceStub(
                sync_channel(stack.settings.endpoint("trainer"))
            )
            jobs = trainer.ListJobs(trainer_pb2.ListJobsRequest(limit=500), timeout=10).jobs
            return Held(frozenset(j.id for j in jobs))
    except grpc.RpcError:
        return None
    return None


def wait_indexed(stack: Stack, load: Load, timeout_s: float) -> tuple[bool, list[str]]:
    """Waits until every document acknowledged so far is searchable; (done, the order)."""
    deadline = time.monotonic() + timeout_s
    while True:
        order, _ = load.snapshot()
        try:
            expected = load.expected()
            indexed, _ = index_state(stack, expected)
        except grpc.RpcError:
            indexed = set()
        if len(indexed) == len(order):
            return True, order
        if time.monotonic() > deadline:
            return False, order
        time.sleep(2)


def kill_and_recover(
    stack: Stack,
    component: str,
    load: Load,
    since: int,
    warmup_s: float = 5,
    timeout_s: float = 180,
) -> tuple[Row, int]:
    """Kills ``component`` after ``warmup_s`` of load, starts it again, and waits until every
    document acknowledged so far is searchable. The row is for the documents acknowledged from
    position ``since`` of the load's order on (its counts are filled in by :func:`account`);
    returns it and the position where the next row starts."""
    time.sleep(warmup_s)
    serving = "infer" in stack.components
    before = held_state(stack, component)
    killed_at = time.monotonic()
    stack.stop(component, sig=signal.SIGKILL)
    probe = AskProbe(stack, killed_at, timeout_s) if serving else None
    restart(stack, component)
    row = Row(component, restart_s=round(time.monotonic() - killed_at, 1))
    if probe is not None:
        row.ask_recover_s = probe.result()
    done, order = wait_indexed(stack, load, timeout_s)
    row.acknowledged = len(order) - since
    if done:
        row.recover_s = round(time.monotonic() - killed_at, 1)
    if component in ("monitor", "trainer"):
        stack.wait_serving([component], timeout_s)
    row.state_kept = None if before is None else before.kept_in(held_state(stack, component))
    return row, len(order)


@dataclass
class Tally:
    indexed: int
    duplicated: int
    lost: int
    lost_ids: list[str]


def tally(stack: Stack, load: Load, counts: list[int]) -> list[Tally]:
    """Per row (``counts``: documents acknowledged during each), its documents indexed,
    duplicated and lost (acknowledged, not searchable), as the index holds them now."""
    order, _ = load.snapshot()
    indexed, duplicated = index_state(stack, load.expected())
    tallies, start = [], 0
    for count in counts:
        mine = order[start : start + count]
        start += count
        lost = [d for d in mine if d not in indexed and d not in duplicated]
        dup = sum(d in duplicated for d in mine)
        tallies.append(Tally(count - len(lost) - dup, dup, len(lost), lost[:10]))
    return tallies


def run(
    stack: Stack,
    components: Iterable[str],
    rate: float,
    texts: list[str],
    timeout_s: float = 180,
    drain_s: float = 600,
    attempted: list[str] | None = None,
    raw_rate: float = 0.0,
) -> list[Row]:
    """Kills each component in turn under load; then stops the load, lets the path drain (a
    backlog built while a component was down is not a loss) and counts. The ids of every
    document sent, acknowledged or not, are added to ``attempted`` when given (to delete them
    after: a call that failed on the client's side may still have been accepted). With
    ``raw_rate``, a plain producer writes documents to the raw topic beside the gRPC load."""
    rows: list[Row] = []
    since, failed_before, raw_counts = 0, 0, []
    tag = f"chaos{int(time.time())}"
    load, raw = Load(stack, texts, rate, tag), RawLoad(stack, texts, raw_rate, tag)
    with load, raw:
        for component in components:
            raw_before = len(raw.snapshot()[0])
            row, since = kill_and_recover(stack, component, load, since, timeout_s=timeout_s)
            raw_counts.append(len(raw.snapshot()[0]) - raw_before)
            _, failed = load.snapshot()
            row.failed_calls, failed_before = failed - failed_before, failed
            rows.append(row)
            print(json.dumps(asdict(row)), file=sys.stderr)
    # Documents acknowledged after the last phase's recovery belong to the last row.
    order, _ = load.snapshot()
    if rows:
        rows[-1].acknowledged = len(order) - sum(r.acknowledged for r in rows[:-1])
        raw_counts[-1] = len(raw.snapshot()[0]) - sum(raw_counts[:-1])
    wait_indexed(stack, load, drain_s)
    for row, t in zip(rows, tally(stack, load, [r.acknowledged for r in rows]), strict=True):
        row.indexed, row.duplicated, row.lost = t.indexed, t.duplicated, t.lost
        row.lost_ids = t.lost_ids
    if raw_rate:
        wait_indexed(stack, raw, 60)  # the gRPC path has drained: raw records are read by now
        for row, count, t in zip(rows, raw_counts, tally(stack, raw, raw_counts), strict=True):
            row.raw_acknowledged = count
            row.raw_indexed, row.raw_duplicated, row.raw_lost = t.indexed, t.duplicated, t.lost
    if attempted is not None:
        attempted.extend(load.sent())
        attempted.extend(raw.sent())
    return rows


@dataclass
class OwnStack:
    """Broker, Redis and the knowledge path's services (``full``: the whole stack, Triton and
    the serving side included) on free ports in a temporary run dir."""

    run_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ks-chaos-"))
    full: bool = False

    def __enter__(self) -> Stack:
        services = [*KNOWLEDGE_PATH, *(("infer", "monitor", "trainer") if self.full else ())]
        ports = {
            "KS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "KS_BROKER_STORE_PORT": str(free_port()),
            "KS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            **{f"KS_{s.upper()}_PORT": str(free_port()) for s in services},
            # No /metrics: `make up`'s default metrics ports may be taken by a running stack.
            **{f"KS_{s.upper()}_METRICS_PORT": "0" for s in services},
            "KS_OPENAI_PORT": "0",
        }
        if self.full:
            for name in ("GRPC", "HTTP", "METRICS"):
                ports[f"KS_TRITON_{name}_PORT"] = str(free_port())
        env = {**ports, "KS_RUN_DIR": self.run_dir, "KS_REDIS_PREFIX": "kschaos"}
        os.environ.update(env)  # this process's clients read the same settings and tokens
        self.stack = Stack(self.run_dir, env)
        self.stack.run_dir.mkdir(parents=True, exist_ok=True)
        if self.full:
            self.stack.up(timeout_s=600)
            return self.stack
        self.stack.ensure_tokens()
        self.stack.start_broker()
        self.stack.start_redis()
        self.stack.create_topics()
        for name in KNOWLEDGE_PATH:
            self.stack.start_service(name)
        self.stack.wait_serving(KNOWLEDGE_PATH, 300)
        return self.stack

    def __exit__(self, *exc: object) -> None:
        self.stack.down()


def print_table(rows: list[Row]) -> None:
    cols = [
        "component",
        "acknowledged",
        "indexed",
        "lost",
        "duplicated",
        "recover_s",
        "restart_s",
        "ask_recover_s",
        "state_kept",
        "raw_acknowledged",
        "raw_lost",
    ]
    print("  ".join(c.upper() for c in cols))
    for r in rows:
        values = asdict(r)
        print("  ".join(str(values[c]).ljust(len(c)) for c in cols))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rate", type=float, default=1.0, help="ingest calls per second")
    parser.add_argument(
        "--raw-rate", type=float, default=1.0, help="raw-topic records per second (0: none)"
    )
    parser.add_argument("--recover-timeout", type=float, default=180)
    parser.add_argument("--components", default="", help="default: all of the stack's")
    parser.add_argument("--full", action="store_true", help="the whole stack, serving included")
    parser.add_argument("--running", action="store_true", help="use the `make up` stack")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args(argv)
    every = (*COMPONENTS, *SERVING) if args.full or args.running else COMPONENTS
    components = [c for c in args.components.split(",") if c] or list(every)
    texts = ["\n".join(item["CONTEXTS"]) for item in load_pubmedqa(args.data).values()]
    memory_broker = CommonSettings().broker_storage == "memory"
    if memory_broker:
        components = [c for c in components if c != "broker-store"]
    started = time.monotonic()
    if args.running:
        rows = run(
            Stack(), components, args.rate, texts, args.recover_timeout, raw_rate=args.raw_rate
        )
    else:
        with OwnStack(full=args.full) as stack:
            rows = run(
                stack, components, args.rate, texts, args.recover_timeout, raw_rate=args.raw_rate
            )
    if args.json:
        out = {
            "rate_per_s": args.rate,
            "raw_rate_per_s": args.raw_rate,
            "seconds": round(time.monotonic() - started, 1),
            "rows": [asdict(r) for r in rows],
        }
        print(json.dumps(out))
    else:
        print_table(rows)
    ok = all(
        r.lost == 0
        and r.duplicated == 0
        and r.raw_duplicated == 0
        # See the module's docstring: a memory-only broker loses what ingest had not read.
        and (r.raw_lost == 0 or (r.component == "broker" and memory_broker))
        and r.recover_s is not None
        and r.state_kept is not False
        and (r.ask_recover_s is not None or "infer" not in (c for c in components))
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
