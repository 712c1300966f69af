"""The HTTP app over fake gRPC stubs: what each route sends to the services (the caller's token
included) and how replies, streams and errors come back, read by the official openai client
where it can be (it runs over the app through Starlette's TestClient)."""

from __future__ import annotations

import json

import grpc
import openai
import pytest
from fastapi.testclient import TestClient

from knowstream.embed.v1 import embed_pb2
from knowstream.infer.v1 import infer_pb2
from services.common.tracing import new_trace, parse_traceparent
from services.openai_api.app import create_app
from services.openai_api.settings import OpenAISettings

TOKEN = "ks_reader_secret_0123456789"


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def check_token(metadata) -> None:
    """What the services' interceptor does with the token (the fake's one rule)."""
    if ("authorization", f"Bearer {TOKEN}") not in metadata:
        raise rpc_error(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token")


class FakeStub:
    def __init__(self, backend: FakeBackend):
        self.b = backend

    async def Ask(self, request, metadata, **_):
        self.b.calls.append(("Ask", request, metadata))
        check_token(metadata)
        if request.adapter == "nope":
            raise rpc_error(grpc.StatusCode.NOT_FOUND, "unknown adapter 'nope' (not registered)")
        return self.b.reply

    def AskStream(self, request, metadata, **_):
        self.b.calls.append(("AskStream", request, metadata))

        async def chunks():
            check_token(metadata)
            if request.adapter == "nope":
                raise rpc_error(grpc.StatusCode.NOT_FOUND, "unknown adapter 'nope'")
            for piece in ("Ye", "s [1]."):
                yield infer_pb2.AskChunk(text=piece)
            if self.b.fail_mid_stream:
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Triton went away")
            if self.b.truncate:
                return
            yield infer_pb2.AskChunk(final=self.b.reply)

        return chunks()

    async def ListAdapters(self, request, metadata, **_):
        check_token(metadata)
        return infer_pb2.ListAdaptersResponse(
            adapters=[infer_pb2.AdapterStatus(id="a" * 16, aliases=["live"])],
            rollout=infer_pb2.RolloutState(live="a" * 16),
        )

    async def GetModelInfo(self, request, metadata, **_):
        check_token(metadata)
        return embed_pb2.ModelInfo(model="all-MiniLM-L6-v2", dimension=2)

    async def Embed(self, request, metadata, **_):
        self.b.calls.append(("Embed", request, metadata))
        check_token(metadata)
        return embed_pb2.EmbedResponse(
            embeddings=[
                embed_pb2.Embedding(values=[0.5, float(i)]) for i in range(len(request.texts))
            ],
            model="all-MiniLM-L6-v2",
            dimension=2,
        )


class FakeBackend:
    def __init__(self):
        self.calls: list = []
        self.fail_mid_stream = False
        self.truncate = False  # the stream ends without its final message
        self.reply = infer_pb2.AskResponse(
            request_id="r1",
            answer="Yes [1].",
            adapter="a" * 16,
            route="live",
            prompt_tokens=50,
            completion_tokens=3,
            finish_reason="stop",
            citations=[infer_pb2.Citation(number=1, doc_id="d1", chunk_id="c1", referenced=True)],
        )
        self.infer = self.admin = self.embed = FakeStub(self)

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def http(backend):
    app = create_app(OpenAISettings(), make_backend=lambda: backend)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def client(http):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=TOKEN, http_client=http, max_retries=0
    )


def test_chat_goes_to_ask_with_the_callers_token(client, backend):
    reply = client.chat.completions.create(
        model="knowstream",
        messages=[{"role": "user", "content": "Do statins work?"}],
        max_tokens=8,
        user="alice",
        extra_body={"knowstream": {"k": 2}},
    )
    assert reply.choices[0].message.content == "Yes [1]."
    assert reply.usage.total_tokens == 53
    assert reply.model_extra["knowstream"]["citations"][0]["doc_id"] == "d1"
    name, request, metadata = backend.calls[-1]
    assert name == "Ask" and request.question == "Do statins work?"
    assert (request.adapter, request.k, request.max_tokens, request.caller) == ("", 2, 8, "alice")
    assert ("authorization", f"Bearer {TOKEN}") in metadata


def test_streaming_chat_is_openai_chunks_then_done(client, backend):
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Q?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Yes [1]."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-2].model_extra["knowstream"]["request_id"] == "r1"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert backend.calls[-1][0] == "AskStream" and backend.calls[-1][1].adapter == "base"


def test_raw_stream_ends_with_done_and_carries_a_late_error(http, backend):
    backend.fail_mid_stream = True
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "knowstream", "prompt": "Q?", "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers=headers) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "Ye"
    assert json.loads(events[-2])["error"]["message"] == "Triton went away"
    assert events[-1] == "[DONE]"
    backend.fail_mid_stream, backend.truncate = False, True
    with http.stream("POST", "/v1/completions", json=body, headers=headers) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"


def test_errors_before_the_first_token_get_their_http_status(client, http):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "Q?"}], stream=True
        )
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Q?")


def test_auth_failures_are_401_in_openais_shape(http):
    anonymous = openai.OpenAI(
        base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.models.list()
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    reply = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"})
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_invalid_requests_are_400_in_openais_shape(http):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    cases = [
        ("/v1/chat/completions", "{not json", None),
        ("/v1/chat/completions", json.dumps({"model": "m", "messages": []}), "messages"),
        (
            "/v1/chat/completions",
            json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 3}),
            None,
        ),
        (
            "/v1/completions",
            json.dumps({"model": "m", "prompt": "q", "max_tokens": "many"}),
            "max_tokens",
        ),
        ("/v1/embeddings", json.dumps({"model": "m", "input": [[1, 2]]}), "input.str"),
    ]
    for path, body, param in cases:
        reply = http.post(path, content=body, headers=headers)
        error = reply.json()["error"]
        assert reply.status_code == 400, (path, body, reply.text)
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param, (body, error)
    missing = http.get("/v1/nothing-here", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_models_and_embeddings(client, backend):
    ids = [m.id for m in client.models.list()]
    assert ids == ["knowstream", "SmolLM2-135M-Instruct", "live", "a" * 16, "all-MiniLM-L6-v2"]
    assert client.models.retrieve("live").model_extra["knowstream"]["adapter"] == "a" * 16
    # Unless told, the client asks for base64 and decodes it itself.
    for fmt in (openai.omit, "float"):
        reply = client.embeddings.create(
            model="all-MiniLM-L6-v2", input=["a", "b"], encoding_format=fmt
        )
        assert [list(d.embedding) for d in reply.data] == [[0.5, 0.0], [0.5, 1.0]]
    assert list(backend.calls[-1][1].texts) == ["a", "b"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="a")


def test_health(http):
    assert http.get("/health").json() == {"status": "SERVING"}


def test_a_callers_traceparent_goes_on_the_grpc_call_and_comes_back(http, backend):
    caller = new_trace()
    body = {"model": "knowstream", "messages": [{"role": "user", "content": "Q?"}]}
    headers = {"authorization": f"Bearer {TOKEN}", "traceparent": caller.header()}
    for stream in (False, True):
        reply = http.post("/v1/chat/completions", json=body | {"stream": stream}, headers=headers)
        assert reply.status_code == 200
        returned = parse_traceparent(reply.headers["traceparent"])
        sent = parse_traceparent(dict(backend.calls[-1][2])["traceparent"])
        # The same trace one hop on (a span of this front), on the call and in the response.
        assert returned == sent and returned.trace_id == caller.trace_id
        assert returned.span_id != caller.span_id
    # Without one, a request starts its own trace and says which.
    reply = http.post(
        "/v1/chat/completions", json=body, headers={"authorization": headers["authorization"]}
    )
    assert parse_traceparent(reply.headers["traceparent"]).trace_id not in ("", caller.trace_id)
