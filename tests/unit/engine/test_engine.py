"""The LLM engine on a tiny random Llama (the real SmolLM2 tokenizer, 2 small layers)."""

from __future__ import annotations

import pytest
import torch

from services.engine.engine import LLMEngine
from services.llm.llm import LLMRequest


@pytest.fixture()
def engine(tiny_model, store) -> LLMEngine:
    return LLMEngine(tiny_model, store[0], max_adapters=2, max_new_tokens=32)


def test_mixed_adapter_batch_matches_each_request_alone(engine, store):
    a, b, _ = store[1]
    requests = [
        LLMRequest("hello there", max_new_tokens=8, ignore_eos=True),
        LLMRequest("hello there", adapter=a, max_new_tokens=8, ignore_eos=True),
        LLMRequest("a longer prompt about medicine", adapter=b, max_new_tokens=5, ignore_eos=True),
        LLMRequest("is it?", adapter=a, candidates=["yes", "no", "maybe so"]),
    ]
    together = engine.run(requests)
    for request, batched in zip(requests, together, strict=True):
        alone = engine.run([request])[0]
        assert not batched.error and batched.adapter == request.adapter
        assert batched.text == alone.text
        assert batched.completion_tokens == alone.completion_tokens
        assert batched.candidate_logprobs == pytest.approx(alone.candidate_logprobs, abs=1e-4)
    assert [r.completion_tokens for r in together[:3]] == [8, 8, 5]
    # Random LoRA weights change the outputs: the adapter is really applied.
    assert together[0].mean_logprob != pytest.approx(together[1].mean_logprob, abs=1e-6)


def test_score_mode_equals_the_sum_of_token_logprobs(engine, tiny_model):
    request = LLMRequest("Is the sky blue?", candidates=["yes", "no", "maybe not"])
    result = engine.run([request])[0]
    assert result.finish_reason == "score" and len(result.candidate_logprobs) == 3
    prompt = engine.encode_prompt(request)
    for candidate, score in zip(request.candidates, result.candidate_logprobs, strict=True):
        tokens = engine.tokenizer(candidate, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + tokens])
        with torch.inference_mode():
            logprobs = torch.log_softmax(engine.base(ids).logits[0].float(), dim=-1)
        expected = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens))
        assert score == pytest.approx(expected, abs=1e-3)
    assert (
        result.text
        == request.candidates[result.candidate_logprobs.index(max(result.candidate_logprobs))]
    )


def test_streamed_pieces_add_up_to_the_answer_and_stop_sequences_cut(engine):
    pieces: list[str] = []
    free = engine.run([LLMRequest("tell me", max_new_tokens=12, ignore_eos=True)])[0]
    assert free.text
    stop = free.text.strip()[2:4] or free.text[:1]
    streamed = engine.run(
        [
            LLMRequest(
                "tell me", max_new_tokens=12, ignore_eos=True, stop=[stop], on_text=pieces.append
            )
        ]
    )[0]
    assert "".join(pieces) == streamed.text
    assert stop not in streamed.text and streamed.finish_reason == "stop"
    assert free.text.startswith(streamed.text)


def test_bad_requests_fail_alone(engine, store):
    results = engine.run(
        [
            LLMRequest("fine", max_new_tokens=3),
            LLMRequest("too long", max_new_tokens=33),
            LLMRequest("unknown", adapter="0123456789abcdef", max_new_tokens=2),
            LLMRequest("not an id", adapter="../etc", max_new_tokens=2),
            LLMRequest("   ", max_new_tokens=2),
        ]
    )
    assert not results[0].error and results[0].completion_tokens >= 1
    assert "outside 1..32" in results[1].error
    assert "not in the store" in results[2].error
    assert "not a content-hash id" in results[3].error
    assert "empty prompt" in results[4].error


def test_adapters_load_lazily_and_the_least_recently_used_is_evicted(engine, store):
    a, b, c = store[1]
    assert engine.load_adapter(a) > 0 and engine.load_adapter(a) == 0
    engine.run([LLMRequest("x", adapter=b, max_new_tokens=1)])  # lazy load
    assert engine.loaded_adapters() == [a, b]
    engine.run([LLMRequest("x", adapter=c, max_new_tokens=1)])  # max 2: evicts a
    assert engine.loaded_adapters() == [b, c]
    assert engine.unload_adapter(b) and engine.loaded_adapters() == [c]
    again = engine.run([LLMRequest("x", adapter=a, max_new_tokens=1)])[0]
    assert not again.error and engine.loaded_adapters() == [c, a]


def test_an_adapter_first_loaded_by_a_score_request_leaves_later_loads_working(engine, store):
    # Score requests prepare (and so lazily load) inside inference mode, as Triton's scheduler
    # does; an explicit load afterwards must still work.
    a, b, _ = store[1]
    with torch.inference_mode():
        first = engine.run([LLMRequest("x", adapter=a, candidates=["yes", "no"])])[0]
    assert not first.error and engine.loaded_adapters() == [a]
    assert engine.load_adapter(b) > 0 and engine.loaded_adapters() == [a, b]


def test_scheduler_admits_requests_between_steps_and_matches_solo_runs(engine, store):
    import threading

    from services.engine.engine import Scheduler

    a, b, _ = store[1]
    requests = [
        LLMRequest("first question", max_new_tokens=20, ignore_eos=True),
        LLMRequest(
            "second, longer question about the kidneys",
            adapter=a,
            max_new_tokens=6,
            ignore_eos=True,
        ),
        LLMRequest("third", adapter=b, max_new_tokens=12, ignore_eos=True),
        LLMRequest("fourth joins late", max_new_tokens=9, ignore_eos=True),
        LLMRequest("fifth waits for a free slot", adapter=a, max_new_tokens=4, ignore_eos=True),
        LLMRequest("score me", candidates=["yes", "no"], adapter=b),
        LLMRequest("bad", adapter="feedfacefeedface", max_new_tokens=3),
    ]
    solo = [engine.run([r])[0] for r in requests]
    scheduler = Scheduler(engine, max_batch=3)
    results: dict[int, object] = {}
    done = threading.Event()

    def finish(i: int):
        def callback(result) -> None:
            results[i] = result
            if len(results) == len(requests):
                done.set()

        return callback

    try:
        for i in range(3):
            scheduler.submit(requests[i], finish(i))
        while scheduler.batch.steps < 3:
            threading.Event().wait(0.01)
        loaded = scheduler.call(lambda: engine.loaded_adapters()).result(10)
        assert set(loaded) >= {a, b}
        for i in range(3, len(requests)):
            scheduler.submit(requests[i], finish(i))
        assert done.wait(60), f"only {sorted(results)} finished"
    finally:
        scheduler.stop()
    for i, expected in enumerate(solo):
        got = results[i]
        assert got.error == expected.error, i
        assert got.text == expected.text and got.completion_tokens == expected.completion_tokens, i
        assert got.candidate_logprobs == pytest.approx(expected.candidate_logprobs, abs=1e-4)
    assert scheduler.batch.rows == [] and scheduler.batch.width == 0


def test_a_cancelled_request_stops_generating(engine):
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) >= 2

    result = engine.run(
        [LLMRequest("go on", max_new_tokens=30, ignore_eos=True, is_cancelled=cancelled)]
    )[0]
    assert result.finish_reason == "cancelled" and result.error
    assert result.completion_tokens < 30
