"""The llama.cpp runtime on the tiny random Llama: conversion, every engine feature, and the
transformers runtime as the reference."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.engine.engine import LLMEngine, Scheduler
from services.engine.runtimes import SplitRuntime, convert
from services.llm.llm import LLMRequest, LLMResult


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tiny_model, store) -> LLMEngine:
    return LLMEngine(tiny_model, store[0], max_adapters=3, max_new_tokens=32)


@pytest.fixture(scope="module")
def engine(tiny_model, store, cache) -> LLMEngine:
    return LLMEngine(
        tiny_model,
        store[0],
        max_adapters=2,
        max_new_tokens=32,
        runtime="llamacpp",
        cache_dir=cache,
        runtime_options={"quant": "f32", "kv_tokens": 4096, "max_sequences": 16},
    )


def _requests(a: str, b: str) -> list[LLMRequest]:
    return [
        LLMRequest("hello there", max_new_tokens=8, ignore_eos=True),
        LLMRequest("hello there", adapter=a, max_new_tokens=8, ignore_eos=True),
        LLMRequest("a longer prompt about medicine", adapter=b, max_new_tokens=5, ignore_eos=True),
        LLMRequest("is it?", adapter=a, candidates=["yes", "no", "maybe so"]),
        LLMRequest("is it?", candidates=["yes", "no", "maybe so"]),
    ]


def test_conversion_is_cached_by_content(tiny_model, store, cache, engine):
    root = convert.cache_root(tiny_model, cache)
    model = root / "model-f32.gguf"
    assert model.exists()
    before = model.stat().st_mtime_ns
    a = store[1][0]
    engine.load_adapter(a)
    converted = root / "adapters" / f"{a}.gguf"
    assert converted.exists()
    stamp = converted.stat().st_mtime_ns
    engine.unload_adapter(a)
    assert engine.load_adapter(a) > 0  # loaded again, from the cached conversion
    assert converted.stat().st_mtime_ns == stamp
    assert convert.model_gguf(tiny_model, cache, "f32").stat().st_mtime_ns == before


def test_outputs_match_the_transformers_runtime(engine, reference, store):
    """Same greedy tokens, same log-probabilities (f32 weights both sides), adapters too; a
    batch mixing adapters gives each request what it gets alone."""
    a, b, _ = store[1]
    requests = _requests(a, b)
    together = engine.run(requests)
    expected = reference.run(requests)
    for request, got, want in zip(requests, together, expected, strict=True):
        assert not got.error and got.adapter == request.adapter
        alone = engine.run([request])[0]
        if request.candidates:
            assert got.candidate_logprobs == pytest.approx(want.candidate_logprobs, abs=2e-3)
            assert got.candidate_logprobs == pytest.approx(alone.candidate_logprobs, abs=1e-4)
            assert got.text == want.text
        else:
            assert got.text == want.text == alone.text
            assert got.completion_tokens == want.completion_tokens
            assert got.mean_logprob == pytest.approx(want.mean_logprob, abs=2e-3)
    # The adapter is really applied: its scores differ from the base model's.
    assert together[3].candidate_logprobs != pytest.approx(together[4].candidate_logprobs, abs=1e-3)


def test_streaming_stop_sequences_and_bad_requests(engine):
    free = engine.run([LLMRequest("tell me", max_new_tokens=12, ignore_eos=True)])[0]
    stop = free.text.strip()[2:4] or free.text[:1]
    pieces: list[str] = []
    streamed = engine.run(
        [
            LLMRequest(
                "tell me", max_new_tokens=12, ignore_eos=True, stop=[stop], on_text=pieces.append
            )
        ]
    )[0]
    assert "".join(pieces) == streamed.text and streamed.finish_reason == "stop"
    assert stop not in streamed.text and free.text.startswith(streamed.text)
    bad = engine.run(
        [
            LLMRequest("x", adapter="0123456789abcdef", max_new_tokens=2),
            LLMRequest("ok", max_new_tokens=2),
        ]
    )
    assert "not in the store" in bad[0].error and not bad[1].error


def test_adapters_evict_least_recently_used(engine, store):
    a, b, c = store[1]
    engine.run([LLMRequest("x", adapter=a, max_new_tokens=1)])
    engine.run([LLMRequest("x", adapter=b, max_new_tokens=1)])
    engine.run([LLMRequest("x", adapter=c, max_new_tokens=1)])
    assert engine.loaded_adapters() == [b, c]
    assert set(engine.runtime.adapters) == {b, c}  # type: ignore[attr-defined]


def test_scheduler_batches_continuously_cancels_and_frees_every_sequence(engine, store):
    a, b, _ = store[1]
    requests = [*_requests(a, b), LLMRequest("late one", max_new_tokens=20, ignore_eos=True)]
    solo = [engine.run([r])[0] for r in requests]
    pieces: list[str] = []  # its caller goes away once it has streamed three pieces
    requests.append(
        LLMRequest(
            "never ends",
            max_new_tokens=32,
            ignore_eos=True,
            on_text=pieces.append,
            is_cancelled=lambda: len(pieces) >= 3,
        )
    )
    free_before = len(engine.runtime.free_seqs)  # type: ignore[attr-defined]
    scheduler = Scheduler(engine, max_batch=3)
    results: dict[int, LLMResult] = {}
    done = threading.Event()

    def finish(i: int):
        def callback(result: LLMResult) -> None:
            results[i] = result
            if len(results) == len(requests):
                done.set()

        return callback

    try:
        for i, request in enumerate(requests):
            scheduler.submit(request, finish(i))
        assert done.wait(60), f"only {sorted(results)} finished"
    finally:
        scheduler.stop()
    for i, expected in enumerate(solo):
        assert results[i].text == expected.text, i
        assert results[i].candidate_logprobs == pytest.approx(expected.candidate_logprobs, abs=1e-4)
    assert results[6].finish_reason == "cancelled" and results[6].completion_tokens < 32
    assert max(r.batch_size for r in results.values()) > 1
    assert len(engine.runtime.free_seqs) == free_before  # type: ignore[attr-defined]


def test_a_split_runtime_scores_on_its_scoring_weights_and_generates_on_the_others(
    tiny_model, store, cache, engine
):
    split = LLMEngine(
        tiny_model,
        store[0],
        max_adapters=2,
        max_new_tokens=32,
        runtime="llamacpp",
        cache_dir=cache,
        runtime_options={"quant": "f16", "score_quant": "f32", "kv_tokens": 4096},
    )
    f16 = LLMEngine(
        tiny_model,
        store[0],
        max_new_tokens=32,
        runtime="llamacpp",
        cache_dir=cache,
        runtime_options={"quant": "f16", "kv_tokens": 4096},
    )
    assert isinstance(split.runtime, SplitRuntime)
    a, b, _ = store[1]
    requests = _requests(a, b)
    got = split.run(requests)
    scored_f32, generated_f16 = engine.run(requests), f16.run(requests)
    for request, mine, f32, half in zip(requests, got, scored_f32, generated_f16, strict=True):
        assert not mine.error
        if request.candidates:  # the f32 engine's scores exactly
            assert mine.candidate_logprobs == pytest.approx(f32.candidate_logprobs, abs=1e-5)
        else:  # the f16 engine's tokens
            assert mine.text == half.text and mine.mean_logprob == pytest.approx(half.mean_logprob)
    # An adapter is loaded on both sides, and unloaded from both.
    assert set(split.runtime.generator.adapters) == set(split.runtime.scorer.adapters) == {a, b}  # type: ignore[attr-defined]
    split.unload_adapter(a)
    assert a not in split.runtime.scorer.adapters  # type: ignore[attr-defined]
