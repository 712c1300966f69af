"""The ingest servicer's error contract, without a network: a broker that fails under a send
is UNAVAILABLE (retry), whatever error aiokafka raises for it; a bug is not."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aiokafka.errors import KafkaConnectionError, UnknownError

from knowstream.ingest.v1 import ingest_pb2
from services.ingest.service import IngestServicer


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class FailingPipeline:
    def __init__(self, error: Exception):
        self.error = error

    async def ingest(self, inputs, trace_id=""):
        raise self.error


def ingest(error: Exception) -> None:
    servicer = IngestServicer(FailingPipeline(error), max_batch=10)  # type: ignore[arg-type]
    request = ingest_pb2.IngestDocumentsRequest(documents=[ingest_pb2.Document(id="d", text="t")])
    asyncio.run(servicer.IngestDocuments(request, FakeContext()))  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [UnknownError(), KafkaConnectionError(), ConnectionError()])
def test_a_broker_failing_under_the_send_is_unavailable(error):
    with pytest.raises(Aborted) as aborted:
        ingest(error)
    assert aborted.value.code == grpc.StatusCode.UNAVAILABLE
    assert "unavailable" in aborted.value.details


def test_a_bug_is_not_called_unavailable():
    with pytest.raises(KeyError):
        ingest(KeyError("a bug"))
