"""OpenAI request bodies to AskRequest / EmbedRequest and replies back; gRPC codes to OpenAI's
error shape (services/openai_api/convert.py)."""

from __future__ import annotations

import base64
import struct

import grpc
import pytest
from pydantic import ValidationError

from knowstream.embed.v1 import embed_pb2
from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2
from services.openai_api import convert
from services.openai_api.convert import ApiError
from services.openai_api.schemas import ChatCompletionRequest, CompletionRequest


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "knowstream", "messages": [{"role": "user", "content": "Q?"}], **kw}
    )


def answer(**kw) -> infer_pb2.AskResponse:
    defaults = dict(
        request_id="r1",
        answer="Yes [1].",
        adapter="base",
        route="live",
        confidence=0.5,
        prompt_tokens=90,
        completion_tokens=4,
        finish_reason="stop",
        citations=[
            infer_pb2.Citation(number=1, doc_id="d1", chunk_id="c1", title="T", referenced=True)
        ],
        latency=events_pb2.LatencyBreakdown(retrieve_ms=3, total_ms=40),
    )
    return infer_pb2.AskResponse(**{**defaults, **kw})


def test_model_names_map_to_adapters_like_lorax():
    base = convert.base_name("SmolLM2-135M-Instruct")
    assert convert.adapter_for("knowstream", "knowstream", base) == ""  # the rollout decides
    assert convert.adapter_for("SmolLM2-135M-Instruct", "knowstream", base) == "base"
    assert convert.adapter_for("base", "knowstream", base) == "base"
    assert convert.adapter_for("canary", "knowstream", base) == "canary"
    assert convert.adapter_for("0123456789abcdef", "knowstream", base) == "0123456789abcdef"
    assert convert.base_name("/models/my-llm") == "my-llm"


def test_chat_asks_its_last_user_message():
    body = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Do "},
                    {"type": "text", "text": "statins work?"},
                ],
            },
        ]
    )
    assert convert.chat_question(body) == "Do statins work?"
    with pytest.raises(ApiError) as err:
        convert.chat_question(chat(messages=[{"role": "system", "content": "x"}]))
    assert (err.value.status, err.value.param) == (400, "messages")


def test_ask_request_carries_every_option():
    body = chat(
        max_tokens=99,
        max_completion_tokens=8,
        temperature=0.7,
        top_p=0.9,
        stop="\n",
        user="alice",
        knowstream={
            "retrieval": False,
            "k": 3,
            "template": "step_by_step",
            "candidates": ["yes", "no"],
            "filters": {"domains": ["cardio"]},
        },
    )
    request = convert.ask_request(body, "Q?", "live")
    assert request.question == "Q?" and request.adapter == "live"
    assert request.max_tokens == 8  # max_completion_tokens supersedes max_tokens
    assert request.temperature == pytest.approx(0.7) and request.top_p == pytest.approx(0.9)
    assert list(request.stop) == ["\n"] and request.caller == "alice"
    assert request.no_retrieval and request.k == 3 and request.template == "step_by_step"
    assert list(request.candidates) == ["yes", "no"]
    assert list(request.filters.domains) == ["cardio"]
    # Defaults are the service's: greedy, retrieval on, k and max_tokens left to infer.
    plain = convert.ask_request(chat(), "Q?", "")
    assert (plain.k, plain.max_tokens, plain.temperature, plain.no_retrieval) == (0, 0, 0.0, False)


def test_shapes_that_cannot_be_honoured_are_refused():
    for bad in (
        {"n": 2},
        {"logprobs": True},
        {"tools": [{"type": "function"}]},
        {"max_tokens": -1},
        {"knowstream": {"retrieval": False, "bogus": 1}},
    ):
        with pytest.raises(ValidationError):
            chat(**bad)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(ApiError) as err:  # beyond the protobuf field's range
        convert.ask_request(chat(max_tokens=2**40), "Q?", "")
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_grpc_codes_become_http_statuses(code, status, kind):
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="why")
    error = convert.from_rpc(exc)
    assert (error.status, error.type, error.message) == (status, kind, "why")
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    if code == grpc.StatusCode.NOT_FOUND:
        assert (error.param, error.code) == ("model", "model_not_found")


def test_completions_and_their_extension():
    reply = convert.completion(answer(finish_reason="length"), "knowstream", 7, chat=True)
    assert reply["id"] == "chatcmpl-r1" and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Yes [1]."}
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 90, "completion_tokens": 4, "total_tokens": 94}
    ext = reply["knowstream"]
    assert ext["request_id"] == "r1" and ext["route"] == "live"
    assert ext["citations"][0]["doc_id"] == "d1" and ext["citations"][0]["referenced"]
    assert ext["latency_ms"]["retrieve"] == 3
    text = convert.completion(answer(finish_reason="score"), "base", 7, chat=False)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Yes [1]."
    assert text["choices"][0]["finish_reason"] == "stop"


def test_stream_chunks():
    opening = convert.chunk(True, "id", "m", 1, role=True)
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    piece = convert.chunk(True, "id", "m", 1, text="Ye")
    assert piece["object"] == "chat.completion.chunk"
    assert piece["choices"][0] == {
        "index": 0,
        "logprobs": None,
        "finish_reason": None,
        "delta": {"content": "Ye"},
    }
    last = convert.chunk(True, "id", "m", 1, final=answer())
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert last["knowstream"]["citations"]
    assert convert.chunk(False, "id", "m", 1, text="x")["choices"][0]["text"] == "x"
    usage = convert.usage_chunk(True, "id", "m", 1, answer())
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 94


def test_models_list_base_adapters_and_the_aliases_set_now():
    reply = infer_pb2.ListAdaptersResponse(
        adapters=[
            infer_pb2.AdapterStatus(id="a" * 16, aliases=["live"], created_at_ms=5000),
            infer_pb2.AdapterStatus(id="b" * 16, aliases=["candidate", "canary"]),
        ],
        rollout=infer_pb2.RolloutState(live="a" * 16, candidate="b" * 16, mode="canary"),
    )
    data = convert.models(reply, "knowstream", "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2")["data"]
    by_id = {m["id"]: m for m in data}
    assert list(by_id) == [
        "knowstream",
        "SmolLM2-135M-Instruct",
        "live",
        "canary",
        "candidate",
        "a" * 16,
        "b" * 16,
        "all-MiniLM-L6-v2",
    ]
    assert by_id["live"]["knowstream"]["adapter"] == "a" * 16
    assert by_id["canary"]["knowstream"]["adapter"] == "b" * 16
    assert by_id["a" * 16]["created"] == 5 and by_id["a" * 16]["object"] == "model"
    assert by_id["all-MiniLM-L6-v2"]["knowstream"]["kind"] == "embedding"
    # No rollout: live is the base model, and shadow/canary/candidate are not listed.
    empty = convert.models(infer_pb2.ListAdaptersResponse(), "knowstream", "B", "E")["data"]
    assert [m["id"] for m in empty] == ["knowstream", "B", "live", "E"]
    assert empty[2]["knowstream"]["adapter"] == "base"


def test_embeddings_as_floats_and_base64():
    reply = embed_pb2.EmbedResponse(
        embeddings=[embed_pb2.Embedding(values=[0.5, -1.0]), embed_pb2.Embedding(values=[0.25, 0])],
        model="all-MiniLM-L6-v2",
        dimension=2,
    )
    floats = convert.embeddings(reply, "all-MiniLM-L6-v2", "float")
    assert [d["embedding"] for d in floats["data"]] == [[0.5, -1.0], [0.25, 0.0]]
    assert [d["index"] for d in floats["data"]] == [0, 1]
    packed = convert.embeddings(reply, "all-MiniLM-L6-v2", "base64")["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(packed)) == (0.5, -1.0)
