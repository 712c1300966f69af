"""Load shedding: requests cancelled while they wait never reach the model, the scheduler
refuses one beyond its waiting room, the model's and Triton's queue-policy rejections become
RESOURCE_EXHAUSTED / UNAVAILABLE with a message, and a patient caller waits for room."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from services.common.errors import ServiceError
from services.engine.engine import LLMEngine, Scheduler
from services.infer.answerer import Answerer
from services.infer.settings import InferSettings
from services.llm.llm import OVERLOADED, LLMRequest, LLMResult
from services.llm.triton import Generation, TritonLLM, TritonOverloaded, _error


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


def _until(condition, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_scheduler_refuses_a_request_beyond_its_waiting_room(engine):
    scheduler = Scheduler(engine, max_batch=1, max_waiting=1)
    gate, one_answered, four_answered = threading.Event(), threading.Event(), threading.Event()

    def held() -> bool:  # polled by the scheduler thread: holds it until the gate opens
        gate.wait()
        return False

    try:
        first = LLMRequest("one", max_new_tokens=8, ignore_eos=True, is_cancelled=held)
        assert scheduler.try_submit(first, lambda r: one_answered.set())
        _until(lambda: scheduler.waiting() == 0)  # "one" is taken (held at its prefill)
        assert scheduler.try_submit(LLMRequest("two", max_new_tokens=2), lambda r: None)
        # One taken, one waiting: the room is full, what model.execute() sheds.
        assert scheduler.held() == 2
        assert not scheduler.try_submit(LLMRequest("three", max_new_tokens=2), lambda r: None)
        gate.set()
        # "one" leaves the count before its caller hears: a place is free when it does.
        assert one_answered.wait(60)
        assert scheduler.try_submit(
            LLMRequest("four", max_new_tokens=2), lambda r: four_answered.set()
        )
        assert four_answered.wait(60)
        _until(lambda: scheduler.held() == 0)
    finally:
        gate.set()
        scheduler.stop()


def test_the_waiting_room_closes_while_the_model_sheds(engine):
    scheduler = Scheduler(engine, max_batch=1, max_waiting=1, waiting_closed_s=3600)
    gate = threading.Event()
    answered: list[threading.Event] = []

    def held() -> bool:  # polled by the scheduler thread: holds it until the gate opens
        gate.wait()
        return False

    def submit(name: str, hold: bool = False) -> bool:
        answered.append(threading.Event())
        request = LLMRequest(name, max_new_tokens=2, is_cancelled=held if hold else None)
        return scheduler.try_submit(request, lambda r, done=answered[-1]: done.set())

    try:
        assert scheduler.room() == 2
        assert submit("one", hold=True)
        _until(lambda: scheduler.waiting() == 0)  # "one" is taken (held at its prefill)
        assert submit("two")  # into the waiting room: nothing was refused yet
        assert not submit("three")  # the room is full: refused, and the room closes
        assert scheduler.room() == 1
        gate.set()
        assert answered[0].wait(60) and answered[1].wait(60)
        _until(lambda: scheduler.held() == 0)
        gate.clear()
        assert submit("four", hold=True)  # a free slot still admits
        assert not submit("five")  # where the open room would have held it
        scheduler.waiting_closed_s = 0.0  # the refusal is past: the room is open again
        assert scheduler.room() == 2 and submit("six")
        gate.set()
        assert answered[3].wait(60) and answered[5].wait(60)
    finally:
        gate.set()
        scheduler.stop()


@pytest.mark.parametrize("candidates", [[], ["yes", "no"]], ids=["generation", "scoring"])
def test_a_failed_step_answers_what_it_had_taken_and_frees_its_place(
    engine, monkeypatch, candidates
):
    scheduler = Scheduler(engine, max_batch=2, max_waiting=0)
    prepare = engine.prepare

    def failing(request, pinned=frozenset()):  # type: ignore[no-untyped-def]
        if request.prompt == "boom":
            raise RuntimeError("the disk went away")
        return prepare(request, pinned)

    monkeypatch.setattr(engine, "prepare", failing)
    answers: list[LLMResult] = []
    answered = threading.Event()

    def record(result: LLMResult) -> None:
        answers.append(result)
        answered.set()

    try:
        assert scheduler.try_submit(LLMRequest("boom", candidates=candidates), record)
        assert answered.wait(60)
        assert answers[0].error == "RuntimeError: the disk went away", answers
        _until(lambda: scheduler.held() == 0)
        answered.clear()
        assert scheduler.try_submit(
            LLMRequest("fine", max_new_tokens=2, candidates=candidates), record
        )
        assert answered.wait(60)
        assert not answers[1].error and len(answers) == 2
    finally:
        scheduler.stop()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("[request id: <id_unknown>] Exceeds maximum queue size", "RESOURCE_EXHAUSTED"),
        ("Request timeout expired", "UNAVAILABLE"),
        (f"{OVERLOADED}: 8 requests wait already", "RESOURCE_EXHAUSTED"),
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


def test_a_patient_generate_is_sent_again_until_admitted_and_others_are_shed():
    sent: list[float] = []
    shed = {"left": 2}

    async def shed_twice(request, timeout_s, priority):  # type: ignore[no-untyped-def]
        sent.append(timeout_s)
        shed["left"] -= 1
        if shed["left"] >= 0:
            raise TritonOverloaded(OVERLOADED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return Generation(text="yes", finish_reason="stop")

    async def main() -> None:
        llm = TritonLLM("127.0.0.1:1", "llm")
        llm._generate_once = shed_twice  # type: ignore[method-assign]
        assert (await llm.generate(LLMRequest("q"), 10.0, patient=True)).text == "yes"
        assert len(sent) == 3 and sent[0] > sent[2]  # each try: what is left of the timeout
        sent.clear()
        shed["left"] = 10**6  # shed from here on
        with pytest.raises(TritonOverloaded):  # not patient: shed at once
            await llm.generate(LLMRequest("q"), 10.0)
        assert len(sent) == 1
        with pytest.raises(TritonOverloaded):
            await llm.generate(LLMRequest("q"), 0.3, patient=True)  # gives up at its timeout
        await llm.close()

    asyncio.run(main())
