"""The infer service's client of the LLM model in Triton (tritonclient's gRPC aio client).

Every call is a gRPC stream to the decoupled model: streamed requests get text pieces then a
final response, whole requests one final response. Transport failures become
:class:`TritonUnavailable`, requests shed by the model's queue policy :class:`TritonOverloaded`,
refusals by the model :class:`TritonRejected`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from services.common.retry import ShedBackoff
from services.llm.llm import OVERLOADED, LLMRequest, LLMResult


class TritonUnavailable(Unavailable):
    pass


class TritonDeadline(DeadlineExceeded):
    pass


class TritonOverloaded(ResourceExhausted):
    """The request was shed: the model's admission limit was reached or Triton's queue was full
    (``code`` RESOURCE_EXHAUSTED), or it waited in Triton's queue past its timeout
    (UNAVAILABLE; deploy/triton/llm/config.pbtxt). Retrying later may succeed."""

    def __init__(self, message: str, code: grpc.StatusCode):
        super().__init__(f"the model is overloaded, retry later: {message}", code)


# What Triton 2.51's schedulers answer when they shed a request (core scheduler_utils.cc).
_QUEUE_FULL = "Exceeds maximum queue size"
_QUEUE_TIMEOUT = "Request timeout expired"


class TritonRejected(FailedPrecondition):
    """The model answered with an error about the request (bad adapter, prompt too long...)."""


@dataclass
class Generation(LLMResult):
    """The engine's :class:`LLMResult` as this client received it from Triton, and the call's
    wall time. An empty one (no adapter, batch 0) stands for an answer that did not come."""

    adapter: str = ""
    batch_size: int = 0
    # Wall time of the call as seen here.
    latency_ms: float = 0.0


def _bytes_input(name: str, values: list[str]) -> InferInput:
    tensor = InferInput(name, [1, len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([[v.encode() for v in values]], dtype=object))
    return tensor


def _scalar(name: str, value: Any, dtype: str, np_type: Any) -> InferInput:
    tensor = InferInput(name, [1, 1], dtype)
    tensor.set_data_from_numpy(np.array([[value]], dtype=np_type))
    return tensor


def request_inputs(request: LLMRequest, stream: bool) -> list[InferInput]:
    # The same set of inputs for every request: Triton's dynamic batcher only groups requests
    # that carry the same inputs.
    return [
        _bytes_input("prompt", [request.prompt]),
        _bytes_input("system", [request.system]),
        _bytes_input("adapter", [request.adapter]),
        _scalar("max_new_tokens", request.max_new_tokens, "INT32", np.int32),
        _scalar("temperature", request.temperature, "FP32", np.float32),
        _scalar("top_p", request.top_p, "FP32", np.float32),
        _bytes_input("stop", request.stop or [""]),
        _bytes_input("candidates", request.candidates or [""]),
        _scalar("stream", stream, "BOOL", np.bool_),
        _scalar("raw_prompt", request.raw_prompt, "BOOL", np.bool_),
        _scalar("ignore_eos", request.ignore_eos, "BOOL", np.bool_),
    ]


def _text(result: Any, name: str) -> str:
    value = result.as_numpy(name)
    return "" if value is None else value.reshape(-1)[0].decode()


def _number(result: Any, name: str) -> float:
    value = result.as_numpy(name)
    return 0.0 if value is None else float(value.reshape(-1)[0])


def _error(exc: InferenceServerException, url: str) -> Exception:
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    if _QUEUE_FULL in message or OVERLOADED in message:
        return TritonOverloaded(
            f"Triton's queue for the model is full ({message})", grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    if _QUEUE_TIMEOUT in message:
        return TritonOverloaded(
            f"the request waited in Triton's queue past its timeout ({message})",
            grpc.StatusCode.UNAVAILABLE,
        )
    if "DEADLINE" in status or "Deadline" in message:
        return TritonDeadline(f"Triton did not answer within the deadline ({message})")
    if "UNAVAILABLE" in status or "failed to connect" in message or "Socket closed" in message:
        return TritonUnavailable(f"Triton at {url} is unavailable: {message}")
    return TritonRejected(message)


class TritonLLM:
    def __init__(self, url: str, model: str, channel_args: list[tuple[str, Any]] | None = None):
        """``channel_args``: gRPC options, those of every client channel
        (services.common.clients.client_options); None = tritonclient's defaults."""
        self.url = url
        self.model = model
        if channel_args is not None:
            # Given channel args replace all of tritonclient's, its keepalive ones included.
            keep = triton_aio.KeepAliveOptions()
            channel_args = [
                *channel_args,
                ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
            ]
        self.client = triton_aio.InferenceServerClient(url, channel_args=channel_args)

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model))
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.close()

    async def _responses(
        self, inputs: list[InferInput], timeout_s: float, priority: int = 0
    ) -> AsyncIterator[Any]:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            # The queue timeout (µs) is the caller's deadline: Triton rejects a request still
            # queued when its caller would have given up, instead of starting it.
            timeout_us = max(1, int(timeout_s * 1e6))
            yield {
                "model_name": self.model,
                "inputs": inputs,
                "priority": priority,
                "timeout": timeout_us,
            }

        try:
            async for result, error in self.client.stream_infer(
                requests(), stream_timeout=max(0.001, timeout_s)
            ):
                if error is not None:
                    raise _error(error, self.url)
                yield result
        except InferenceServerException as exc:
            raise _error(exc, self.url) from exc
        except grpc.aio.AioRpcError as exc:  # the stream API lets transport errors through raw
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TritonDeadline(
                    f"Triton did not answer within the deadline ({exc.details()})"
                ) from exc
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise TritonUnavailable(
                    f"Triton at {self.url} is unavailable: {exc.details()}"
                ) from exc
            raise TritonRejected(f"{exc.code().name}: {exc.details()}") from exc

    async def stream(
        self, request: LLMRequest, timeout_s: float, priority: int = 0
    ) -> AsyncIterator[str | Generation]:
        """Text pieces as they come, then the final :class:`Generation`."""
        start = time.perf_counter()
        async for result in self._responses(request_inputs(request, True), timeout_s, priority):
            reason = _text(result, "finish_reason")
            if not reason:
                yield _text(result, "text")
                continue
            yield self._generation(result, start)
            return
        raise TritonUnavailable("Triton closed the stream without a final response")

    async def generate(
        self, request: LLMRequest, timeout_s: float, priority: int = 0, patient: bool = False
    ) -> Generation:
        """One whole answer. ``patient``: a shed request is sent again (with backoff, within
        ``timeout_s``) instead of failing; for background work, such as the trainer's scoring,
        that would rather wait for room than be refused beside live traffic."""
        backoff = ShedBackoff(timeout_s)
        while True:
            try:
                return await self._generate_once(request, backoff.left(), priority)
            except TritonOverloaded:
                wait = backoff.next_wait() if patient else None
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    async def _generate_once(
        self, request: LLMRequest, timeout_s: float, priority: int
    ) -> Generation:
        start = time.perf_counter()
        async for result in self._responses(request_inputs(request, False), timeout_s, priority):
            if _text(result, "finish_reason"):
                return self._generation(result, start)
        raise TritonUnavailable("Triton closed the stream without a final response")

    def _generation(self, result: Any, start: float) -> Generation:
        logprobs = result.as_numpy("candidate_logprobs")
        return Generation(
            text=_text(result, "text"),
            adapter=_text(result, "adapter"),
            finish_reason=_text(result, "finish_reason"),
            prompt_tokens=int(_number(result, "prompt_tokens")),
            completion_tokens=int(_number(result, "completion_tokens")),
            mean_logprob=_number(result, "mean_logprob"),
            candidate_logprobs=[] if logprobs is None else [float(v) for v in logprobs.ravel()],
            compute_ms=_number(result, "compute_ms"),
            batch_size=int(_number(result, "batch_size")),
            latency_ms=(time.perf_counter() - start) * 1000,
        )

    async def control(
        self, op: str, adapter_id: str = "", timeout_s: float = 120
    ) -> dict[str, Any]:
        """Adapter control inside the model: load, unload or list."""
        inputs = [
            _bytes_input("prompt", ["-"]),
            _bytes_input("control", [json.dumps({"op": op, "adapter_id": adapter_id})]),
        ]
        async for result in self._responses(inputs, timeout_s):
            return dict(json.loads(_text(result, "text")))
        raise TritonUnavailable("Triton closed the stream without a response")
