"""Triton python-backend model: a thin adapter between Triton requests and
services.engine.engine.LLMEngine (all logic, and its tests, live there)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's python backend

from services.common.models import resolve_llm_dir
from services.engine.engine import LLMEngine, Scheduler
from services.engine.settings import EngineSettings
from services.llm.llm import BASE, OVERLOADED, EngineError, LLMRequest, LLMResult

log = logging.getLogger("knowstream.triton.llm")

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _first(request, name, default):  # type: ignore[no-untyped-def]
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return default
    item = value[0]
    return item.decode("utf-8") if isinstance(item, bytes) else item.item()


def _strings(request, name):  # type: ignore[no-untyped-def]
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [v.decode("utf-8") for v in tensor.as_numpy().reshape(-1) if v]


def _response(result: LLMResult, text: str | None = None):  # type: ignore[no-untyped-def]
    def tensor(name, values, dtype):  # type: ignore[no-untyped-def]
        return pb_utils.Tensor(name, np.array([values], dtype=dtype))

    return pb_utils.InferenceResponse(
        output_tensors=[
            tensor("text", [(result.text if text is None else text).encode()], object),
            tensor("adapter", [result.adapter.encode()], object),
            tensor("finish_reason", [result.finish_reason.encode()], object),
            tensor("prompt_tokens", [result.prompt_tokens], np.int32),
            tensor("completion_tokens", [result.completion_tokens], np.int32),
            tensor("mean_logprob", [result.mean_logprob], np.float32),
            pb_utils.Tensor(
                "candidate_logprobs",
                np.array([result.candidate_logprobs or [0.0]], dtype=np.float32),
            ),
            tensor("compute_ms", [result.compute_ms], np.float32),
            tensor("batch_size", [result.batch_size], np.int32),
        ]
    )


def _error(message: str):  # type: ignore[no-untyped-def]
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def _streamer(sender, adapter: str) -> Callable[[str], None]:  # type: ignore[no-untyped-def]
    partial = LLMResult(adapter=adapter, finish_reason="")

    def send(piece: str) -> None:
        try:
            sender.send(_response(partial, piece))
        except Exception as exc:  # cancelled stream; the scheduler notices at its next check
            log.info("could not stream a piece: %s", exc)

    return send


def _finisher(sender) -> Callable[[LLMResult], None]:  # type: ignore[no-untyped-def]
    def finish(result: LLMResult) -> None:
        # A streamed request already got its text piece by piece; the final response carries
        # the totals (and the whole text, for clients that want it in one piece).
        try:
            sender.send(_error(result.error) if result.error else _response(result), flags=FINAL)
        except Exception as exc:  # the caller went away (cancelled): nobody to answer
            log.info("could not send a final response: %s", exc)

    return finish


class TritonPythonModel:
    """Requests go to the engine's continuous-batching scheduler; responses are sent from the
    scheduler thread (decoupled mode). Batching follows the model configuration: with
    ``dynamic_batching`` up to max_batch_size requests share each forward pass, without it they
    are served one at a time.

    Admission: the scheduler holds a full batch and at most KS_ENGINE_MAX_WAITING requests more,
    none more within KS_ENGINE_WAITING_CLOSED_S of a refusal; a request beyond them is answered
    at once with OVERLOADED (the infer service: RESOURCE_EXHAUSTED, "retry later"). So under
    sustained overload an admitted request keeps about the latency it has at capacity however
    much more is offered. (Blocking execute() instead let the excess queue in Triton: at 4x
    capacity the admitted requests' p99 was 4.7 s against 1.2 s at capacity; README.)"""

    def initialize(self, args):  # type: ignore[no-untyped-def]
        settings = EngineSettings()
        logging.basicConfig(level=settings.log_level)
        config = json.loads(args["model_config"])
        batching = "dynamic_batching" in config
        self.engine = LLMEngine(
            resolve_llm_dir(settings.llm_model, settings.cache_dir),
            settings.adapter_dir,
            max_adapters=settings.llm_max_adapters,
            max_prompt_tokens=settings.llm_max_prompt_tokens,
            max_new_tokens=settings.llm_max_new_tokens,
            threads=settings.llm_threads,
            runtime=settings.engine_runtime,
            cache_dir=settings.cache_dir,
            runtime_options=(
                {
                    "quant": settings.engine_quant,
                    "kv_tokens": settings.engine_kv_tokens,
                    "decode_threads": settings.engine_decode_threads,
                    "score_quant": settings.engine_score_quant,
                }
                if settings.engine_runtime == "llamacpp"
                else {}
            ),
        )
        max_batch = int(config.get("max_batch_size") or 1) if batching else 1
        self.scheduler = Scheduler(
            self.engine,
            max_batch,
            max_waiting=settings.engine_max_waiting,
            waiting_closed_s=settings.engine_waiting_closed_s,
        )
        log.info(
            "llm model ready: batching %s, up to %d requests per step",
            "on" if batching else "off",
            max_batch,
        )

    def execute(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            sender = request.get_response_sender()
            control = _first(request, "control", "")
            if control:
                self._submit_control(control, sender)
                continue
            try:
                llm_request = LLMRequest(
                    prompt=_first(request, "prompt", ""),
                    system=_first(request, "system", ""),
                    adapter=_first(request, "adapter", "") or BASE,
                    max_new_tokens=int(_first(request, "max_new_tokens", 64)),
                    temperature=float(_first(request, "temperature", 0.0)),
                    top_p=float(_first(request, "top_p", 1.0)),
                    stop=_strings(request, "stop"),
                    candidates=_strings(request, "candidates"),
                    raw_prompt=bool(_first(request, "raw_prompt", False)),
                    ignore_eos=bool(_first(request, "ignore_eos", False)),
                )
            except (UnicodeDecodeError, ValueError) as exc:
                sender.send(_error(f"bad request: {exc}"), flags=FINAL)
                continue
            if _first(request, "stream", False):
                llm_request.on_text = _streamer(sender, llm_request.adapter)
            llm_request.is_cancelled = request.is_cancelled
            if not self.scheduler.try_submit(llm_request, _finisher(sender)):
                held = self.scheduler.held()
                sender.send(_error(f"{OVERLOADED}: {held} requests are held already"), flags=FINAL)
        return None

    def _submit_control(self, control: str, sender) -> None:  # type: ignore[no-untyped-def]
        def reply(future: Future) -> None:  # type: ignore[type-arg]
            error = future.exception()
            sender.send(future.result() if error is None else _error(str(error)), flags=FINAL)

        self.scheduler.call(lambda: self._control(control)).add_done_callback(reply)

    def _control(self, raw: str):  # type: ignore[no-untyped-def]
        try:
            command = json.loads(raw)
            op = command.get("op")
            adapter_id = str(command.get("adapter_id", ""))
            payload: dict = {}
            # Runs on the scheduler thread between steps; adapters of running requests stay.
            in_use = frozenset(row.request.adapter for row in self.scheduler.batch.rows)
            if op == "load":
                payload["load_s"] = self.engine.load_adapter(adapter_id, in_use)
            elif op == "unload":
                if adapter_id in in_use:
                    raise EngineError(f"adapter {adapter_id} is serving requests right now")
                payload["unloaded"] = self.engine.unload_adapter(adapter_id)
            elif op != "list":
                raise EngineError(f"unknown control op {op!r} (load, unload, list)")
        except (EngineError, ValueError, AttributeError) as exc:
            return _error(str(exc))
        payload["loaded"] = self.engine.loaded_adapters()
        return _response(LLMResult(text=json.dumps(payload), finish_reason="control"))

    def finalize(self):  # type: ignore[no-untyped-def]
        self.scheduler.stop()
