"""Load shedding under overload: Ask at about 4x the measured capacity.

First the capacity: ``--clients`` closed-loop clients (the model's batch size) send Ask back to
back for ``--seconds``; their throughput is the capacity and their latency the "at capacity"
figure. Then an open loop offers ``--factor`` times that rate for ``--seconds``: each request
is either admitted (answered) or shed (RESOURCE_EXHAUSTED when the model's admission limit,
KS_ENGINE_MAX_WAITING, or Triton's queue is full; UNAVAILABLE when it waited past its
timeout). Reports how fast the excess is rejected (target: p99 <= 100 ms) and the admitted
requests' latency against the at-capacity one; last, after a quiet spell, a burst of a full
batch and the waiting room at once, which should all be answered. Prints JSON.

    python -m bench.overload --seconds 30        # against a `make up` stack
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import grpc

from bench.common import DEFAULT_DATA, load_pubmedqa, log, percentiles
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.clients import channel
from services.common.settings import CommonSettings

SHED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
TARGET_REJECTION_MS = 100.0


class Driver:
    def __init__(self, stub: infer_pb2_grpc.InferServiceStub, questions: list[str], tokens: int):
        self.stub = stub
        self.questions = questions
        self.tokens = tokens
        self.sent = 0

    def request(self) -> infer_pb2.AskRequest:
        self.sent += 1
        # No retrieval and a fixed length: every request costs the model the same.
        return infer_pb2.AskRequest(
            question=self.questions[self.sent % len(self.questions)],
            no_retrieval=True,
            max_tokens=self.tokens,
            ignore_eos=True,
        )

    async def one(self, timeout_s: float) -> tuple[str, float]:
        """("ok" | a status code name, seconds)."""
        start = time.perf_counter()
        try:
            await self.stub.Ask(self.request(), timeout=timeout_s)
            outcome = "ok"
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name
        return outcome, time.perf_counter() - start


async def capacity(d: Driver, clients: int, seconds: float, timeout_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            outcome, took = await d.one(timeout_s)
            if outcome == "ok":
                latencies.append(took)
            else:
                errors[outcome] += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests_per_s": round(len(latencies) / wall, 3),
        "latency_s": percentiles(latencies) if latencies else {},
        "errors": dict(errors),
    }


async def overload(
    d: Driver, rate: float, seconds: float, timeout_s: float, onset_s: float
) -> dict[str, Any]:
    """An open loop: arrivals at ``rate`` per second whatever the answers take."""
    results: list[tuple[str, float]] = []
    steady: list[float] = []  # admitted requests sent after the first onset_s
    tasks = []

    async def record(sent_s: float) -> None:
        outcome, took = await d.one(timeout_s)
        results.append((outcome, took))
        if outcome == "ok" and sent_s >= onset_s:
            steady.append(took)

    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(record(i / rate)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    admitted = [t for o, t in results if o == "ok"]
    shed = [t for o, t in results if o in {c.name for c in SHED}]
    codes = Counter(o for o, _ in results)
    rejection = percentiles([t * 1000 for t in shed]) if shed else {}
    return {
        "offered_per_s": round(rate, 3),
        "requests": n,
        "admitted": len(admitted),
        "shed": len(shed),
        "outcomes": dict(codes),
        "admitted_per_s": round(len(admitted) / wall, 3),
        "admitted_latency_s": percentiles(admitted) if admitted else {},
        # Without the onset, when the waiting room was still open (KS_ENGINE_WAITING_CLOSED_S).
        "admitted_latency_after_onset_s": percentiles(steady) if steady else {},
        "onset_s": onset_s,
        "rejection_ms": rejection,
        "rejection_p99_within_target": bool(rejection) and rejection["p99"] <= TARGET_REJECTION_MS,
    }


async def burst(d: Driver, size: int, quiet_s: float, timeout_s: float) -> dict[str, Any]:
    """After ``quiet_s`` without traffic, ``size`` requests at once (a burst at a quiet model,
    which the waiting room is there to absorb)."""
    await asyncio.sleep(quiet_s)
    results = await asyncio.gather(*(d.one(timeout_s) for _ in range(size)))
    codes = Counter(o for o, _ in results)
    return {"size": size, "after_quiet_s": quiet_s, "answered": codes["ok"], "outcomes": codes}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = CommonSettings()
    questions = [item["QUESTION"] for item in load_pubmedqa(args.data).values()]
    chan = channel(settings.address(settings.infer_port))
    d = Driver(infer_pb2_grpc.InferServiceStub(chan), questions, args.tokens)
    try:
        await d.one(args.timeout)  # warm-up
        log(f"measuring capacity ({args.clients} clients, {args.seconds} s)")
        at_capacity = await capacity(d, args.clients, args.seconds, args.timeout)
        rate = max(0.5, at_capacity["requests_per_s"]) * args.factor
        log(f"capacity {at_capacity['requests_per_s']} req/s; offering {rate:.2f} req/s")
        over = await overload(d, rate, args.seconds, args.timeout, args.onset)
        log(f"a burst of {args.burst} after {args.quiet} s without traffic")
        quiet_burst = await burst(d, args.burst, args.quiet, args.timeout)
    finally:
        await chan.close(None)
    return {
        "bench": "overload",
        "cpus": os.cpu_count(),
        "model": settings.llm_model,
        "new_tokens": args.tokens,
        "factor": args.factor,
        "at_capacity": at_capacity,
        "overload": over,
        "burst": quiet_burst,
        "target_rejection_ms": TARGET_REJECTION_MS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients (capacity)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--factor", type=float, default=4.0, help="overload / capacity")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per answer")
    parser.add_argument("--timeout", type=float, default=60.0, help="client deadline, s")
    parser.add_argument(
        "--onset", type=float, default=5.0, help="s of the overload left out of its steady p99"
    )
    parser.add_argument(
        "--burst", type=int, default=10, help="requests at once after the quiet time (8 + 2 held)"
    )
    parser.add_argument(
        "--quiet", type=float, default=8.0, help="s without traffic before the burst (> 5 s)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
