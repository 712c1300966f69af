"""Serving benchmarks through the running stack (`make up`): Triton dynamic batching, gRPC +
Triton overhead, adapter hot swap, adapter cost and PubMedQA yes/no/maybe accuracy.

    .venv/bin/python -m bench.serving --json [--sections batching,overhead,swap,...]

Every section talks to the infer service (gRPC) which calls Triton; requests use
PubMedQA questions. Generation requests are greedy with ``ignore_eos`` so every request does the
same work (32 new tokens). The last line printed is one JSON object with every figure.

Over 400 lines because it holds five sections side by side; each is a function over one shared
load generator, so their figures are taken the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import DEFAULT_DATA, load_pubmedqa, log, percentiles, searchable, stubs
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from services.cli.documents import pubmedqa_document
from services.common.adapter_upload import upload_adapter
from services.common.adapters import create_random_adapter
from services.common.auth import triton_admin_headers
from services.common.clients import patiently, sync_channel
from services.common.models import resolve_llm_dir
from services.common.settings import CommonSettings

NEW_TOKENS = 32
LABELS = ["yes", "no", "maybe"]


class Bench:
    def __init__(self, settings: CommonSettings, questions: list[str]):
        self.settings = settings
        chan = sync_channel(settings.address(settings.infer_port))
        self.infer = infer_pb2_grpc.InferServiceStub(chan)
        self.admin = infer_pb2_grpc.AdapterAdminServiceStub(chan)
        self.questions = questions

    def generate_request(self, i: int, adapter: str = "base") -> infer_pb2.AskRequest:
        return infer_pb2.AskRequest(
            question=self.questions[i % len(self.questions)],
            no_retrieval=True,
            max_tokens=NEW_TOKENS,
            ignore_eos=True,
            adapter=adapter,
        )

    def load(
        self, clients: int, per_client: int, make: Callable[[int], infer_pb2.AskRequest]
    ) -> dict[str, Any]:
        """``clients`` threads each send ``per_client`` requests back to back."""
        latencies: list[float] = []
        tokens = 0
        batch_sizes: list[int] = []
        failures = 0
        lock = threading.Lock()

        def run(c: int) -> None:
            nonlocal tokens, failures
            for k in range(per_client):
                t = time.perf_counter()
                request = make(c * per_client + k)

                def ask(left: float, r: infer_pb2.AskRequest = request) -> infer_pb2.AskResponse:
                    return self.infer.Ask(r, timeout=left)

                try:
                    # Closed-loop clients wait for an answer: one shed (more clients than the
                    # model holds, as with batching off) is sent again.
                    reply = patiently(ask, 600)
                except grpc.RpcError as exc:
                    log(f"request failed: {exc.code().name} {exc.details()}")
                    with lock:
                        failures += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)
                    tokens += reply.completion_tokens
                    batch_sizes.append(reply.batch_size)

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(run, range(clients)))
        wall = time.perf_counter() - start
        return {
            "clients": clients,
            "requests": len(latencies),
            "failed": failures,
            "requests_per_s": round(len(latencies) / wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "latency_s": percentiles(latencies),
            "mean_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else 0,
        }


def triton_client(settings: CommonSettings):  # type: ignore[no-untyped-def]
    import tritonclient.grpc as triton_grpc

    return triton_grpc.InferenceServerClient(settings.address(settings.triton_grpc_port))


def reload_model(settings: CommonSettings, batching: bool) -> float:
    """Reloads the LLM model in Triton with dynamic batching on or off; returns the seconds the
    reload took (Triton serves the old instance until the new one is ready)."""
    client = triton_client(settings)
    config = client.get_model_config(settings.triton_model, as_json=True)["config"]
    if batching:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": 5000,
            "priority_levels": 2,
            "default_priority_level": 1,
        }
    else:
        config.pop("dynamic_batching", None)
    # A changed parameter makes Triton really reload (an identical config is a no-op).
    config.setdefault("parameters", {})["reload_token"] = {"string_value": str(time.time())}
    start = time.perf_counter()
    # The repository API answers only with the stack's admin key (deploy/stack.py).
    client.load_model(
        settings.triton_model, config=json.dumps(config), headers=triton_admin_headers(settings)
    )
    took = time.perf_counter() - start
    deadline = time.monotonic() + 300
    while not client.is_model_ready(settings.triton_model) and time.monotonic() < deadline:
        time.sleep(0.5)
    return took


def bench_batching(b: Bench, rounds: int, passes: int) -> dict[str, Any]:
    """Dynamic batching off, then on, ``passes`` times (the model is reloaded with the other
    config each time); figures per mode are from the last pass, the speedup is the ratio of
    the median 8-client throughputs over all passes (this machine's speed drifts by 20-30%
    over minutes, so one off/on pair alone can mislead)."""
    out: dict[str, Any] = {"new_tokens": NEW_TOKENS, "passes": passes}
    eight: dict[str, list[float]] = {"off": [], "on": []}
    reloads: list[float] = []
    for _ in range(passes):
        for mode in ("off", "on"):
            log(f"batching {mode}: reloading the model")
            reloads.append(reload_model(b.settings, mode == "on"))
            b.load(2, 1, b.generate_request)  # warm-up
            out[mode] = {}
            for clients in (1, 4, 8):
                result = b.load(clients, rounds if clients > 1 else rounds + 2, b.generate_request)
                log(f"batching {mode} {clients} clients: {result}")
                out[mode][f"{clients}_clients"] = result
            eight[mode].append(out[mode]["8_clients"]["requests_per_s"])
    out["requests_per_s_8_clients"] = eight
    out["model_reload_s"] = [round(r, 2) for r in reloads]
    off8 = statistics.median(eight["off"])
    out["speedup_8_clients"] = round(statistics.median(eight["on"]) / off8, 2) if off8 else None
    return out


def bench_overhead(b: Bench, repeats: int) -> dict[str, Any]:
    """Same prompt, 32 new tokens, one request at a time: Ask through gRPC + Triton vs the
    engine called in this process. The two are interleaved so drift hits both alike."""
    from services.engine.engine import LLMEngine
    from services.llm.llm import LLMRequest
    from services.llm.prompts import build_prompt

    settings = b.settings
    engine = LLMEngine(
        resolve_llm_dir(settings.llm_model, settings.cache_dir), settings.adapter_dir, threads=2
    )
    question = b.questions[0]
    prompt = build_prompt(question, [])
    local = LLMRequest(
        prompt=prompt.user,
        system=prompt.system,
        max_new_tokens=NEW_TOKENS,
        ignore_eos=True,
    )
    request = b.generate_request(0, adapter="base")
    engine.run([local])
    b.infer.Ask(request, timeout=600)
    inproc, grpc_total, grpc_generate, triton_compute = [], [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.run([local])
        inproc.append(time.perf_counter() - t)
        t = time.perf_counter()
        reply = b.infer.Ask(request, timeout=600)
        grpc_total.append(time.perf_counter() - t)
        grpc_generate.append(reply.latency.generate_ms / 1000)
        triton_compute.append(reply.latency.compute_ms / 1000)
        assert reply.completion_tokens == NEW_TOKENS
    # The ceiling of batching on this CPU, without Triton: one static batch of 8 different
    # prompts vs the same prompts one at a time.
    eight = []
    for i in range(8):
        p = build_prompt(b.questions[i], [])
        eight.append(
            LLMRequest(p.user, system=p.system, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        )
    t = time.perf_counter()
    for r in eight:
        engine.run([r])
    one_by_one = time.perf_counter() - t
    t = time.perf_counter()
    engine.run(eight)
    together = time.perf_counter() - t
    del engine
    p50_in = statistics.median(inproc)
    p50_ask = statistics.median(grpc_total)
    return {
        "repeats": repeats,
        "in_process_p50_s": round(p50_in, 4),
        "ask_p50_s": round(p50_ask, 4),
        "ask_generate_p50_s": round(statistics.median(grpc_generate), 4),
        "triton_compute_p50_s": round(statistics.median(triton_compute), 4),
        "overhead_pct": round(100 * (p50_ask - p50_in) / p50_in, 2),
        "in_process_static_batch8_speedup": round(one_by_one / together, 2),
    }


def random_adapters(settings: CommonSettings, n: int, seed0: int) -> list[Path]:
    model_dir = resolve_llm_dir(settings.llm_model, settings.cache_dir)
    root = Path(tempfile.mkdtemp(prefix="ks-bench-adapters-"))
    return [
        create_random_adapter(model_dir, root / f"a{seed0 + i}", seed=seed0 + i, scale=0.05)
        for i in range(n)
    ]


def register(b: Bench, path: Path, load: bool = True) -> str:
    # Uploaded as bytes: the server reads no path a client names outside its import directory.
    status = upload_adapter(b.admin, path, timeout=300, description="bench", load=load)
    return str(status.id)


def bench_swap(b: Bench, flips: int) -> dict[str, Any]:
    """Flips live between two adapters (promote, rollback, ...) while 2 clients send short
    score-mode requests; measures flip call -> first answer served by the new adapter."""
    a_path, b_path = random_adapters(b.settings, 2, 101)
    first, second = register(b, a_path), register(b, b_path)
    b.admin.Promote(infer_pb2.PromoteRequest(adapter=first, reason="bench"), timeout=120)
    served: list[tuple[float, str]] = []  # (time the answer arrived, adapter)
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            request = infer_pb2.AskRequest(
                question=b.questions[(c * 997 + i) % len(b.questions)],
                no_retrieval=True,
                candidates=LABELS,
            )
            i += 1
            try:
                reply = b.infer.Ask(request, timeout=120)
            except grpc.RpcError as exc:
                with lock:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            with lock:
                served.append((time.perf_counter(), reply.adapter))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    swaps, call_s = flip_live(b, first, second, flips, served, lock)
    stop.set()
    for thread in threads:
        thread.join(120)
    in_model_s, in_model_wall, model_reload = load_in_model_vs_reload(b)
    return {
        "flips": flips,
        "p50_swap_s": round(statistics.median(swaps), 4) if swaps else None,
        "max_swap_s": round(max(swaps), 4) if swaps else None,
        "p50_flip_call_s": round(statistics.median(call_s), 4),
        "requests_during": len(served),
        "failed_requests": len(failures),
        "failures": failures[:5],
        "adapter_load_in_model_s": round(in_model_s, 4),
        "adapter_load_call_s": round(in_model_wall, 4),
        "triton_model_reload_s": round(model_reload, 3),
    }


def flip_live(
    b: Bench,
    first: str,
    second: str,
    flips: int,
    served: list[tuple[float, str]],
    lock: threading.Lock,
) -> tuple[list[float], list[float]]:
    """Promotes ``second`` and rolls back to ``first`` in turn, ``flips`` times in all: the
    seconds from each flip call to the first answer ``served`` by the new adapter (flips with
    none within 30 s are left out), and each flip call's seconds."""
    swaps: list[float] = []
    call_s: list[float] = []
    for k in range(flips):
        target = second if k % 2 == 0 else first
        called = time.perf_counter()
        if k % 2 == 0:
            b.admin.Promote(infer_pb2.PromoteRequest(adapter=target, reason="bench"), timeout=120)
        else:
            b.admin.Rollback(infer_pb2.RollbackRequest(reason="bench"), timeout=120)
        call_s.append(time.perf_counter() - called)
        deadline = called + 30
        while time.perf_counter() < deadline:
            with lock:
                hit = next((t for t, a in served if t > called and a == target), None)
            if hit is not None:
                swaps.append(hit - called)
                break
            time.sleep(0.005)
        time.sleep(0.5)
    return swaps, call_s


def load_in_model_vs_reload(b: Bench) -> tuple[float, float, float]:
    """A fresh adapter's load inside the model (the model's seconds and the call's), and a
    reload of the Triton model."""
    # Why adapters load inside the model: the alternative (an adapter per Triton model version,
    # swapped with the repository API) reloads the model, base weights included.
    fresh = register(b, random_adapters(b.settings, 1, 201)[0], load=False)
    load_start = time.perf_counter()
    in_model = b.admin.LoadAdapter(infer_pb2.LoadAdapterRequest(adapter=fresh), timeout=300)
    in_model_wall = time.perf_counter() - load_start
    model_reload = reload_model(b.settings, batching=True)
    return float(in_model.load_s), in_model_wall, model_reload


def bench_adapter_cost(b: Bench, rounds: int) -> dict[str, Any]:
    adapter = register(b, random_adapters(b.settings, 1, 301)[0])
    out: dict[str, Any] = {"adapter": adapter}
    for name, target in (("base", "base"), ("adapter", adapter), ("base_again", "base")):
        b.load(2, 1, lambda i, t=target: b.generate_request(i, t))  # type: ignore[misc]
        out[name] = b.load(8, rounds, lambda i, t=target: b.generate_request(i, t))  # type: ignore[misc]
        log(f"adapter_cost {name}: {out[name]}")
    base = (out["base"]["tokens_per_s"] + out["base_again"]["tokens_per_s"]) / 2
    out["adapter_vs_base"] = round(out["adapter"]["tokens_per_s"] / base, 3)
    return out


def ensure_ingested(settings: CommonSettings, data: dict[str, Any]) -> None:
    ingest, retrieve = stubs(settings)
    docs = [pubmedqa_document(k, v) for k, v in data.items()]
    ingest.IngestDocumentStream(iter(docs), timeout=600)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if len(searchable(retrieve, list(data))) == len(data):
            return
        time.sleep(2)
    raise TimeoutError("the PubMedQA abstracts were not all indexed")


def bench_accuracy(b: Bench, data: dict[str, Any], limit: int, clients: int) -> dict[str, Any]:
    items = list(data.items())[:limit]
    ensure_ingested(b.settings, dict(items))
    out: dict[str, Any] = {"n": len(items), "majority_class": None}
    labels = [item["final_decision"] for _, item in items]
    counts = {label: labels.count(label) for label in LABELS}
    out["majority_class"] = round(max(counts.values()) / len(labels), 4)
    out["label_counts"] = counts
    for name, no_retrieval in (("without_retrieval", True), ("with_retrieval", False)):

        def ask(i: int, nr: bool = no_retrieval) -> tuple[str, bool]:
            pmid, item = items[i]
            reply = b.infer.Ask(
                infer_pb2.AskRequest(
                    question=item["QUESTION"],
                    candidates=LABELS,
                    no_retrieval=nr,
                    adapter="base",
                ),
                timeout=600,
            )
            return reply.answer, pmid in {c.doc_id for c in reply.citations}

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(ask, range(len(items))))
        predicted = [a for a, _ in answers]
        correct = sum(p == gold for p, gold in zip(predicted, labels, strict=True))
        out[name] = {
            "accuracy": round(correct / len(items), 4),
            "macro_f1": round(macro_f1(labels, predicted), 4),
            "predicted": {label: predicted.count(label) for label in LABELS},
            "wall_s": round(time.perf_counter() - start, 1),
        }
        if not no_retrieval:
            out[name]["own_abstract_cited"] = round(sum(c for _, c in answers) / len(items), 4)
        log(f"accuracy {name}: {out[name]}")
    return out


def macro_f1(gold: list[str], predicted: list[str]) -> float:
    scores = []
    for label in LABELS:
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(p == label and g != label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--sections",
        default="batching,overhead,swap,adapter_cost,accuracy",
        help="comma-separated subset",
    )
    parser.add_argument("--rounds", type=int, default=3, help="requests per client (batching)")
    parser.add_argument("--passes", type=int, default=2, help="off/on passes (batching)")
    parser.add_argument("--overhead-repeats", type=int, default=7)
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--accuracy-limit", type=int, default=500)
    parser.add_argument("--accuracy-clients", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = CommonSettings()
    data = load_pubmedqa(args.data)
    bench = Bench(settings, [item["QUESTION"] for item in data.values()])
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results: dict[str, Any] = {"cpus": os.cpu_count(), "model": settings.llm_model}
    started = time.perf_counter()
    for section in sections:
        t = time.perf_counter()
        log(f"== {section}")
        if section == "batching":
            results[section] = bench_batching(bench, args.rounds, args.passes)
        elif section == "overhead":
            results[section] = bench_overhead(bench, args.overhead_repeats)
        elif section == "swap":
            results[section] = bench_swap(bench, args.flips)
        elif section == "adapter_cost":
            results[section] = bench_adapter_cost(bench, args.rounds)
        elif section == "accuracy":
            results[section] = bench_accuracy(
                bench, data, args.accuracy_limit, args.accuracy_clients
            )
        else:
            parser.error(f"unknown section {section}")
        results[section]["section_s"] = round(time.perf_counter() - t, 1)
        if not args.json:
            print(json.dumps({section: results[section]}, indent=2))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
