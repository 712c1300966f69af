"""The OpenAI-compatible API on the real stack, driven by the official openai client: chat (with
citations and its answer event), streaming chat, completions, models, embeddings, and auth and
model errors. Answers are kept to 8 tokens; one small document is the evidence."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from knowstream.events.v1 import events_pb2
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common.auth import load_tokens
from services.common.clients import sync_channel
from services.common.tracing import new_trace
from tests.integration.conftest import read_events, wait_for

pytestmark = pytest.mark.integration

DOC_ID = "openai-api-evidence"
QUESTION = "Does the quorn protocol lower blood pressure?"


@pytest.fixture(scope="module")
def base_url(stack) -> str:
    return f"http://{stack.settings.host}:{stack.settings.openai_port}/v1"


@pytest.fixture(scope="module")
def client(stack, base_url) -> openai.OpenAI:
    """A client with the stack's reader token: every endpoint here needs only reading."""
    tokens = load_tokens(stack.settings)
    assert tokens is not None
    reader = tokens.by_name("reader")
    assert reader is not None
    return openai.OpenAI(base_url=base_url, api_key=reader.secret, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def evidence(stack) -> Iterator[str]:
    address = stack.settings.address
    ingest = ingest_pb2_grpc.IngestServiceStub(sync_channel(address(stack.settings.ingest_port)))
    retrieve = retrieve_pb2_grpc.RetrieveServiceStub(
        sync_channel(address(stack.settings.retrieve_port))
    )
    text = "In a trial of 80 adults the quorn protocol lowered systolic blood pressure by 9 mmHg."
    ingest.IngestDocuments(
        ingest_pb2.IngestDocumentsRequest(
            documents=[ingest_pb2.Document(id=DOC_ID, title="Quorn protocol", text=text)]
        ),
        timeout=60,
    )
    only_it = retrieve_pb2.SearchFilters(doc_ids=[DOC_ID])
    wait_for(
        lambda: (
            retrieve.Search(
                retrieve_pb2.SearchRequest(query=QUESTION, k=1, filters=only_it), timeout=10
            ).hits
        ),
        120,
        "the evidence to be searchable",
    )
    yield DOC_ID
    # Left indexed, it could be retrieved (and trained on) by the modules after this one.
    ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(id=DOC_ID), timeout=10)


def test_chat_answers_with_citations_through_ask(stack, client, evidence):
    trace = new_trace()
    reply = client.chat.completions.create(
        extra_headers={"traceparent": trace.header()},
        model="knowstream",
        messages=[
            {"role": "system", "content": "ignored: the service's own prompt applies"},
            {"role": "user", "content": QUESTION},
        ],
        max_tokens=8,
        extra_body={"knowstream": {"k": 1, "filters": {"doc_ids": [evidence]}}},
    )
    assert reply.object == "chat.completion" and reply.model == "knowstream"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert 0 < reply.usage.completion_tokens <= 8
    ext = reply.model_extra["knowstream"]
    assert [c["doc_id"] for c in ext["citations"]] == [evidence]
    assert ext["route"] in ("live", "canary")
    # The same path as gRPC Ask: the answer is an InferenceEvent with its request id.
    event = read_events(
        stack.settings,
        stack.settings.topic_inference,
        events_pb2.InferenceEvent,
        lambda e: e.request_id == ext["request_id"],
    )
    assert event.question == QUESTION and event.retrieved[0].doc_id == evidence
    assert event.header.trace_id == trace.trace_id  # the HTTP caller's trace crossed over


def test_streaming_chat_and_completions(client, evidence):
    stream = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"knowstream": {"k": 1, "filters": {"doc_ids": [evidence]}}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert text and final.choices[0].finish_reason in ("stop", "length")
    assert final.model_extra["knowstream"]["citations"][0]["doc_id"] == evidence
    assert final.model_extra["knowstream"]["adapter"] == "base"
    assert 0 < chunks[-1].usage.completion_tokens <= 8
    completion = client.completions.create(
        model="knowstream",
        prompt="Is exercise good for the heart?",
        max_tokens=8,
        extra_body={"knowstream": {"retrieval": False}},
    )
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.model_extra["knowstream"]["citations"] == []


def test_models_and_embeddings(stack, client):
    ids = [m.id for m in client.models.list()]
    for expected in ("knowstream", stack.settings.llm_model, "live", stack.settings.embed_model):
        assert expected in ids
    reply = client.embeddings.create(model=stack.settings.embed_model, input=["one", "two"])
    assert len(reply.data) == 2
    vector = list(reply.data[0].embedding)
    assert len(vector) == 384 and math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-3)


def test_auth_and_model_errors(client, base_url):
    stranger = openai.OpenAI(base_url=base_url, api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        stranger.models.list()
    assert err.value.body["type"] == "authentication_error"
    anonymous = httpx.post(f"{base_url}/embeddings", json={"model": "m", "input": "x"}, timeout=30)
    assert anonymous.status_code == 401
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="no-such-adapter", messages=[{"role": "user", "content": "Q?"}], max_tokens=8
        )
    assert missing.value.body["code"] == "model_not_found"
