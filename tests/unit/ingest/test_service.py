"""The ingest servicer's error contract, without a network: a broker that fails under a send
is UNAVAILABLE (retry), whatever error aiokafka raises for it; a bug is not."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aiokafka.errors import KafkaConnectionError, UnknownError

from knowstream.ingest.v1 import ingest_pb2
from services.common.errors import ServiceError
from services.ingest.service import IngestServicer


class FailingPipeline:
    def __init__(self, error: Exception):
        self.error = error

    async def ingest(self, inputs, trace_id=""):
        raise self.error


def ingest(error: Exception) -> None:
    servicer = IngestServicer(FailingPipeline(error), max_batch=10)  # type: ignore[arg-type]
    request = ingest_pb2.IngestDocumentsRequest(documents=[ingest_pb2.Document(id="d", text="t")])
    asyncio.run(servicer.IngestDocuments(request, None))  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [UnknownError(), KafkaConnectionError(), ConnectionError()])
def test_a_broker_failing_under_the_send_is_unavailable(error):
    with pytest.raises(ServiceError) as raised:  # the interceptor answers it with its code
        ingest(error)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "unavailable" in raised.value.message


def test_a_bug_is_not_called_unavailable():
    with pytest.raises(KeyError):
        ingest(KeyError("a bug"))
