"""Engine runtimes side by side in one run (issue 17), in process (no Triton):

    .venv/bin/python -m bench.runtimes --json [--runtimes transformers,llamacpp:q8_0,...]

Per runtime: prefill seconds and decode ms per token at batch 1 on a short (~70 tokens, the
question alone) and a long (~685 tokens, question + abstract) prompt, 32 new tokens, greedy;
static batches of 1/4/8 requests (tokens/s); the cost of a mixed-adapter batch; adapter load
time (first load converts, a later one reads the cached conversion); score mode on labelled
PubMedQA prompts (yes/no/maybe, with the abstract as context) and on knowledge probes, with and
without an adapter: the share of prompts where the chosen candidate is the transformers
runtime's, and the largest log-probability difference. The transformers runtime always runs
first (it is the reference). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_DATA, load_pubmedqa, log
from services.common.adapters import create_random_adapter, store_adapter
from services.common.models import resolve_llm_dir
from services.common.probes import probe_documents, pubmedqa_document
from services.common.settings import CommonSettings
from services.engine.engine import DecodeBatch, LLMEngine
from services.llm.llm import BASE, LLMRequest, LLMResult
from services.llm.prompts import Passage, build_prompt

NEW_TOKENS = 32
LABELS = ["yes", "no", "maybe"]


def make_engine(
    spec: str, model_dir: Path, store: Path, cache: Path, decode_threads: int = 1
) -> LLMEngine:
    """``spec``: transformers, or llamacpp[:QUANT][@DECODE_THREADS] (e.g. llamacpp:q8_0@2)."""
    spec, _, threads = spec.partition("@")
    name, _, quant = spec.partition(":")
    options: dict[str, Any] = {}
    if name == "llamacpp":
        options = {"decode_threads": int(threads or decode_threads)} | (
            {"quant": quant} if quant else {}
        )
    return LLMEngine(
        model_dir, store, threads=2, runtime=name, cache_dir=cache, runtime_options=options
    )


def prompts(data: dict[str, Any]) -> dict[str, LLMRequest]:
    item = next(iter(data.values()))
    short = build_prompt(item["QUESTION"], [])
    passage = Passage("", "", "", " ".join(item["CONTEXTS"]))
    long = build_prompt(item["QUESTION"], [passage])
    return {
        name: LLMRequest(p.user, system=p.system, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        for name, p in (("short", short), ("long", long))
    }


def latency(engine: LLMEngine, request: LLMRequest, repeats: int) -> dict[str, Any]:
    """Prefill (prompt -> first token) and decode per token at batch 1, medians."""
    prefill, decode = [], []
    ids = engine.encode_prompt(request)
    for _ in range(repeats + 1):  # the first run warms up
        batch = DecodeBatch(engine)
        t = time.perf_counter()
        batch.admit([(request, ids, LLMResult())], lambda r: None)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        steps = 0
        while batch.rows:
            batch.step()
            steps += 1
        decode.append((time.perf_counter() - t) * 1000 / max(1, steps))
    return {
        "prompt_tokens": len(ids),
        "prefill_s": round(statistics.median(prefill[1:]), 4),
        "decode_ms_per_token": round(statistics.median(decode[1:]), 2),
    }


def throughput(engine: LLMEngine, request: LLMRequest, adapter: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (1, 4, 8):
        t = time.perf_counter()
        results = engine.run([request] * n)
        out[f"batch_{n}_tokens_per_s"] = round(
            sum(r.completion_tokens for r in results) / (time.perf_counter() - t), 1
        )
    mixed = [
        LLMRequest(**{**request.__dict__, "adapter": adapter if i % 2 else BASE}) for i in range(8)
    ]
    t = time.perf_counter()
    results = engine.run(mixed)
    assert not any(r.error for r in results), [r.error for r in results]
    out["batch_8_mixed_adapters_tokens_per_s"] = round(
        sum(r.completion_tokens for r in results) / (time.perf_counter() - t), 1
    )
    return out


def score_sets(data: dict[str, Any], limit: int, probes: int) -> dict[str, list[LLMRequest]]:
    items = list(data.values())[:limit]
    pubmedqa = []
    for item in items:
        passage = Passage("", "", "", " ".join(item["CONTEXTS"]))
        p = build_prompt(item["QUESTION"], [passage], candidates=LABELS)
        pubmedqa.append(LLMRequest(p.user, system=p.system, candidates=LABELS))
    docs = [pubmedqa_document(k, v) for k, v in list(data.items())[:60]]
    found = probe_documents(docs, max_per_document=2)[:probes]
    knowledge = [LLMRequest(p.prefix, candidates=p.candidates, raw_prompt=True) for p in found]
    return {"pubmedqa": pubmedqa, "probes": knowledge}


def scores(engine: LLMEngine, requests: list[LLMRequest], adapter: str) -> list[list[float]]:
    out = []
    for start in range(0, len(requests), 4):
        part = [
            LLMRequest(**{**r.__dict__, "adapter": adapter}) for r in requests[start : start + 4]
        ]
        results = engine.run(part)
        assert not any(r.error for r in results), [r.error for r in results]
        out += [r.candidate_logprobs for r in results]
    return out


def agreement(mine: list[list[float]], reference: list[list[float]]) -> dict[str, Any]:
    same = sum(m.index(max(m)) == r.index(max(r)) for m, r in zip(mine, reference, strict=True))
    diffs = [
        abs(a - b) for m, r in zip(mine, reference, strict=True) for a, b in zip(m, r, strict=True)
    ]
    return {
        "n": len(mine),
        "same_choice": round(same / len(mine), 4),
        "max_abs_logprob_diff": round(max(diffs), 4),
        "median_abs_logprob_diff": round(statistics.median(diffs), 5),
    }


def bench_runtime(
    spec: str,
    paths: tuple[Path, Path, Path],
    adapter: tuple[str, Path],
    args: Any,
    ref: dict[str, Any],
) -> dict[str, Any]:
    model_dir, store, cache = paths
    t = time.perf_counter()
    engine = make_engine(spec, model_dir, store, cache)
    out: dict[str, Any] = {"startup_s": round(time.perf_counter() - t, 2)}
    first = engine.load_adapter(adapter[0])
    engine.unload_adapter(adapter[0])
    out["adapter_load_s"] = {
        "first": round(first, 3),
        "again": round(engine.load_adapter(adapter[0]), 3),
    }
    requests = prompts(args.data_obj)
    for name, request in requests.items():
        out[f"latency_{name}"] = latency(engine, request, args.repeats)
        log(f"{spec} {name}: {out[f'latency_{name}']}")
    out["throughput_short"] = throughput(engine, requests["short"], adapter[0])
    log(f"{spec} throughput: {out['throughput_short']}")
    for set_name, reqs in args.score_sets.items():
        for which, adapter_id in (("base", BASE), ("adapter", adapter[0])):
            t = time.perf_counter()
            got = scores(engine, reqs, adapter_id)
            key = f"score_{set_name}_{which}"
            out[key] = {"prompts_per_s": round(len(reqs) / (time.perf_counter() - t), 2)}
            if key in ref:
                out[key].update(agreement(got, ref[key]))
            else:
                ref[key] = got
            log(f"{spec} {key}: {out[key]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runtimes", default="transformers,llamacpp:f32,llamacpp:q8_0,llamacpp:q4_1"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pubmedqa", type=int, default=100)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = CommonSettings()
    model_dir = resolve_llm_dir(settings.llm_model, settings.cache_dir)
    args.data_obj = load_pubmedqa(args.data)
    args.score_sets = score_sets(args.data_obj, args.pubmedqa, args.probes)
    report: dict[str, Any] = {"new_tokens": NEW_TOKENS, "threads": 2, "runtimes": {}}
    ref: dict[str, Any] = {}
    specs = args.runtimes.split(",")
    if specs[0] != "transformers":
        specs.insert(0, "transformers")
    with tempfile.TemporaryDirectory() as tmp:
        source = create_random_adapter(model_dir, Path(tmp) / "src", seed=7)
        adapter_id, _ = store_adapter(source, Path(tmp) / "store")
        paths = (model_dir, Path(tmp) / "store", settings.cache_dir)
        for spec in specs:
            report["runtimes"][spec] = bench_runtime(spec, paths, (adapter_id, source), args, ref)
    print(json.dumps(report, indent=2 if not args.json else None))


if __name__ == "__main__":
    main()
