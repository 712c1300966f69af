"""OpenAI request bodies to knowstream's gRPC requests and replies back, and gRPC status codes
to OpenAI's error shape. Pure functions: no network, tested with fakes (tests/unit)."""

from __future__ import annotations

import base64
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from knowstream.embed.v1 import embed_pb2
from knowstream.infer.v1 import infer_pb2
from knowstream.retrieve.v1 import retrieve_pb2
from services.common.adapters import ALIASES, BASE, Rollout
from services.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
)

# Aliases listed by /v1/models (base is listed as the base model itself).
LISTED_ALIASES = tuple(a for a in ALIASES if a != BASE)


@dataclass
class ApiError(Exception):
    """An error as OpenAI's API answers it: an HTTP status and ``{"error": {...}}``."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# gRPC status -> (HTTP status, OpenAI error type, error code).
_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    # What the infer service answers when the model refuses a request (prompt too long...).
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "insufficient_role"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", None),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


def from_rpc(exc: grpc.RpcError) -> ApiError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(code)
    status, kind, error_code = _STATUS.get(code, (500, "server_error", None))
    # Ask's only NOT_FOUND is the adapter the model names.
    param = "model" if code == grpc.StatusCode.NOT_FOUND else None
    return ApiError(status, details, kind, param, error_code)


def base_name(llm_model: str) -> str:
    """The base model's name as clients see it: KS_LLM_MODEL, or a local directory's name."""
    return Path(llm_model).name or llm_model


def adapter_for(model: str, routed_name: str, base: str) -> str:
    """``model`` as AskRequest.adapter, the way LoRAX and vLLM read it: the routed name is no
    adapter (the rollout decides), the base model's name is the base, anything else an adapter
    id or alias, which the infer service resolves (NOT_FOUND when it names nothing)."""
    if model == routed_name:
        return ""
    if model in (base, BASE):
        return BASE
    return model


def chat_question(body: ChatCompletionRequest) -> str:
    """The question a chat asks: its last user message. Answers are stateless (an AskRequest has
    no history), and the system prompt is the service's own, the one adapters are trained on."""
    for message in reversed(body.messages):
        if message.role == "user":
            return message.text()
    raise ApiError(400, "messages need a user message", param="messages")


def completion_question(body: CompletionRequest) -> str:
    return body.prompt if isinstance(body.prompt, str) else body.prompt[0]


def ask_request(body: GenerationRequest, question: str, adapter: str) -> infer_pb2.AskRequest:
    options = body.knowstream
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    filters = options.filters
    try:
        return infer_pb2.AskRequest(
            question=question,
            k=options.k,
            filters=retrieve_pb2.SearchFilters(
                domains=filters.domains, sources=filters.sources, doc_ids=filters.doc_ids
            )
            if filters
            else None,
            adapter=adapter,
            max_tokens=max_tokens or 0,
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 0.0,
            stop=body.stops(),
            candidates=options.candidates,
            no_retrieval=not options.retrieval,
            template=options.template,
            caller=body.user or "",
        )
    except (ValueError, TypeError) as exc:  # a number out of the protobuf field's range
        raise ApiError(400, f"invalid request: {exc}") from exc


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(response: infer_pb2.AskResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.prompt_tokens + response.completion_tokens,
    }


def extension(response: infer_pb2.AskResponse) -> dict[str, Any]:
    """The ``knowstream`` field of a reply: what an AskResponse says beyond the text."""
    latency = response.latency
    return {
        "request_id": response.request_id,
        "adapter": response.adapter,
        "route": response.route,
        "confidence": response.confidence,
        "citations": [
            {
                "number": c.number,
                "doc_id": c.doc_id,
                "chunk_id": c.chunk_id,
                "title": c.title,
                "score": c.score,
                "referenced": c.referenced,
            }
            for c in response.citations
        ],
        "candidate_logprobs": list(response.candidate_logprobs),
        "latency_ms": {
            "retrieve": latency.retrieve_ms,
            "prompt": latency.prompt_ms,
            "generate": latency.generate_ms,
            "total": latency.total_ms,
        },
    }


def _envelope(chat: bool, stream: bool, reply_id: str, model: str, created: int) -> dict[str, Any]:
    kind = "text_completion"
    if chat:
        kind = "chat.completion.chunk" if stream else "chat.completion"
    return {"id": reply_id, "object": kind, "created": created, "model": model}


def completion(
    response: infer_pb2.AskResponse, model: str, created: int, chat: bool
) -> dict[str, Any]:
    """A whole answer as a chat completion (``chat``) or a text completion."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": response.answer}
    else:
        choice["text"] = response.answer
    choice["finish_reason"] = finish_reason(response.finish_reason)
    reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{response.request_id}"
    return {
        **_envelope(chat, False, reply_id, model, created),
        "choices": [choice],
        "usage": usage(response),
        "knowstream": extension(response),
    }


def chunk(
    chat: bool,
    chunk_id: str,
    model: str,
    created: int,
    text: str | None = None,
    final: infer_pb2.AskResponse | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """One event of a stream: a piece of text, the chat's opening (``role``: the assistant's
    turn begins), or (``final``) the end of the choice with the finish reason and the
    ``knowstream`` extension (citations are known only then)."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
    if final is not None:
        choice["finish_reason"] = finish_reason(final.finish_reason)
    if chat:
        choice["delta"] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            choice["delta"]["content"] = text
    else:
        choice["text"] = text or ""
    out = {**_envelope(chat, True, chunk_id, model, created), "choices": [choice]}
    if final is not None:
        out["knowstream"] = extension(final)
    return out


def usage_chunk(chat: bool, chunk_id: str, model: str, created: int, final: Any) -> dict[str, Any]:
    """stream_options.include_usage: the last event before [DONE], no choices, the usage."""
    return {**_envelope(chat, True, chunk_id, model, created), "choices": [], "usage": usage(final)}


def _rollout(state: infer_pb2.RolloutState) -> Rollout:
    return Rollout(live=state.live or BASE, candidate=state.candidate, mode=state.mode or "off")


def _model(name: str, created: int, kind: str, **details: Any) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "knowstream",
        "knowstream": {"kind": kind, **details},
    }


def models(
    reply: infer_pb2.ListAdaptersResponse, routed_name: str, base: str, embed_model: str
) -> dict[str, Any]:
    """The routed name, the base model, every registered adapter, the aliases set now, and the
    embedding model."""
    rollout = _rollout(reply.rollout)
    data = [
        _model(routed_name, 0, "routed", adapter=rollout.live, mode=rollout.mode),
        _model(base, 0, "base", adapter=BASE),
    ]
    for alias in LISTED_ALIASES:
        target = rollout.resolve_alias(alias)
        if target is not None:
            data.append(_model(alias, 0, "alias", adapter=target))
    for a in reply.adapters:
        data.append(
            _model(
                a.id,
                a.created_at_ms // 1000,
                "adapter",
                adapter=a.id,
                parent=a.parent or BASE,
                aliases=list(a.aliases),
                loaded=a.loaded,
                description=a.description,
            )
        )
    data.append(_model(embed_model, 0, "embedding"))
    return {"object": "list", "data": data}


def embeddings(reply: embed_pb2.EmbedResponse, model: str, encoding: str) -> dict[str, Any]:
    def encode(values: Any) -> Any:
        if encoding == "base64":  # little-endian float32, what OpenAI's clients decode
            return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        return list(values)

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(e.values)}
            for i, e in enumerate(reply.embeddings)
        ],
        "model": model,
        # The embed service does not count tokens; OpenAI's clients require the field.
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
