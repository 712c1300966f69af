"""The error contract: an error raised in any kind of handler reaches the caller with its own
gRPC code and message; anything else is INTERNAL with a request id; a request that cannot be
decoded is INVALID_ARGUMENT for streams as for unary calls."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from services.common.settings import CommonSettings
from tests.utils.grpcapp import RunningApp

SERVICE = "knowstream.test.v1.Errors"
REQ = health_pb2.HealthCheckRequest
RESP = health_pb2.HealthCheckResponse


def _raise(service: str) -> None:
    if service == "missing":
        raise NotFound("no such thing 'missing'")
    if service == "busy":
        raise ResourceExhausted("the model is overloaded, retry later")
    if service == "state":
        raise FailedPrecondition("change the rollout first")
    if service == "bug":
        raise RuntimeError("a bug")


def _handlers() -> grpc.GenericRpcHandler:
    async def uu(request, context):
        _raise(request.service)
        return RESP()

    async def us(request, context):
        yield RESP()  # an error after the first message still carries its code
        _raise(request.service)

    async def su(requests, context):
        async for request in requests:
            _raise(request.service)
        return RESP()

    async def ss(requests, context):
        async for request in requests:
            _raise(request.service)
            yield RESP()

    de, ser = REQ.FromString, RESP.SerializeToString
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "UU": grpc.unary_unary_rpc_method_handler(uu, de, ser),
            "US": grpc.unary_stream_rpc_method_handler(us, de, ser),
            "SU": grpc.stream_unary_rpc_method_handler(su, de, ser),
            "SS": grpc.stream_stream_rpc_method_handler(ss, de, ser),
        },
    )


@pytest.fixture(scope="module")
def channel():
    settings = CommonSettings(auth="off", kafka_bootstrap="127.0.0.1:9")
    running = RunningApp(settings, lambda app: app.server.add_generic_rpc_handlers([_handlers()]))
    with grpc.insecure_channel(running.address) as chan:
        yield chan
    running.close()


def _call(chan: grpc.Channel, kind: str, payload: bytes) -> None:
    path = f"/{SERVICE}/{kind}"
    raw = lambda b: b  # noqa: E731  (bytes through unchanged: undecodable ones too)
    if kind == "UU":
        chan.unary_unary(path, raw, RESP.FromString)(payload, timeout=10)
    elif kind == "US":
        list(chan.unary_stream(path, raw, RESP.FromString)(payload, timeout=10))
    elif kind == "SU":
        chan.stream_unary(path, raw, RESP.FromString)(iter([payload]), timeout=10)
    else:
        list(chan.stream_stream(path, raw, RESP.FromString)(iter([payload]), timeout=10))


KINDS = ["UU", "US", "SU", "SS"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("service", "code", "text"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND, "no such thing"),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "retry later"),
        ("state", grpc.StatusCode.FAILED_PRECONDITION, "rollout"),
        ("bug", grpc.StatusCode.INTERNAL, "internal error (RuntimeError): a bug [request "),
    ],
)
def test_every_rpc_kind_answers_an_error_with_its_code(channel, kind, service, code, text):
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, kind, REQ(service=service).SerializeToString())
    assert info.value.code() == code
    assert text in info.value.details()


@pytest.mark.parametrize("kind", KINDS)
def test_an_undecodable_request_is_invalid_argument_for_every_kind(channel, kind):
    invalid_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding bytes that are not UTF-8
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, kind, invalid_utf8)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()


def test_a_call_that_succeeds_is_untouched(channel):
    _call(channel, "US", REQ(service="ok").SerializeToString())
    _call(channel, "SS", REQ(service="ok").SerializeToString())


def test_only_the_shared_wiring_answers_errors_by_hand():
    """Servicers raise ServiceError subclasses; context.abort belongs to the interceptor (and
    the auth check it runs), so one place decides how an error reaches a caller."""
    services = Path(__file__).resolve().parents[3] / "services"
    allowed = {"common/grpcserver.py", "common/authz.py"}
    by_hand = sorted(
        str(path.relative_to(services))
        for path in services.rglob("*.py")
        if "gen" not in path.relative_to(services).parts[:1]
        and str(path.relative_to(services)) not in allowed
        and "context.abort(" in path.read_text(encoding="utf-8")
    )
    assert by_hand == []
