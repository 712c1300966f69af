"""Load shedding: requests cancelled while they wait never reach the model, the scheduler
pushes back once a batch's worth waits, and Triton's queue-policy rejections become
RESOURCE_EXHAUSTED / UNAVAILABLE with a message."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from services.common.errors import ServiceError
from services.infer.answerer import Answerer
from services.infer.engine import LLMEngine, Scheduler
from services.infer.settings import InferSettings
from services.llm.llm import LLMRequest, LLMResult
from services.llm.triton import TritonOverloaded, _error


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory) -> LLMEngine:
    return LLMEngine(tiny_model, tmp_path_factory.mktemp("store"), max_new_tokens=64)


def test_a_request_cancelled_while_waiting_is_dropped_before_its_prefill(engine):
    scheduler = Scheduler(engine, max_batch=1, max_waiting=1)
    done: dict[str, LLMResult] = {}
    finished = threading.Event()

    def on_done(name: str):  # type: ignore[no-untyped-def]
        def record(result: LLMResult) -> None:
            done[name] = result
            if len(done) == 2:
                finished.set()

        return record

    try:
        scheduler.submit(LLMRequest("go on", max_new_tokens=40, ignore_eos=True), on_done("a"))
        gone = LLMRequest("and this", max_new_tokens=5, is_cancelled=lambda: True)
        scheduler.submit(gone, on_done("b"))
        assert finished.wait(60)
    finally:
        scheduler.stop()
    assert done["b"].finish_reason == "cancelled" and done["b"].prompt_tokens == 0
    assert done["a"].completion_tokens == 40


def test_the_scheduler_pushes_back_once_a_batch_waits(engine):
    scheduler = Scheduler(engine, max_batch=1, max_waiting=1)
    gate, finished = threading.Event(), threading.Event()

    def held() -> bool:  # polled by the scheduler thread: holds it until the gate opens
        gate.wait()
        return False

    try:
        first = LLMRequest("one", max_new_tokens=8, ignore_eos=True, is_cancelled=held)
        scheduler.submit(first, lambda r: None)
        scheduler.submit(LLMRequest("two", max_new_tokens=2), lambda r: None)
        scheduler.submit(LLMRequest("three", max_new_tokens=2), lambda r: finished.set())
        assert not scheduler.wait_for_room(0.05)  # what model.execute() waits on
        gate.set()
        assert scheduler.wait_for_room(60) and finished.wait(60)
    finally:
        gate.set()
        scheduler.stop()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("[request id: <id_unknown>] Exceeds maximum queue size", "RESOURCE_EXHAUSTED"),
        ("Request timeout expired", "UNAVAILABLE"),
    ],
)
def test_triton_queue_policy_rejections_are_overload(message, code):
    err = _error(InferenceServerException(message, "StatusCode.UNAVAILABLE"), "t:8001")
    assert isinstance(err, TritonOverloaded) and err.code.name == code


def test_the_infer_service_answers_overload_with_its_code():
    class Shedding:
        async def generate(self, request, timeout_s, priority=0):  # type: ignore[no-untyped-def]
            raise TritonOverloaded("queue full", grpc.StatusCode.RESOURCE_EXHAUSTED)

    answerer = Answerer(InferSettings(), None, Shedding(), None, None, None)  # type: ignore[arg-type]
    # A ServiceError: the shared interceptor answers it with its code
    # (tests/unit/common/test_errors.py).
    with pytest.raises(ServiceError) as caught:
        asyncio.run(answerer._generate(LLMRequest("q"), 1.0, None))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "overloaded, retry later" in caught.value.message
