"""Client-side helpers: channels to the services (with the process's token and TLS) and health
probes.

Every channel to a knowstream service is made here, so credentials are attached in one place:
each call carries ``authorization: Bearer <secret>`` (a client interceptor, because call
credentials need TLS and plaintext is the local default) and the channel is TLS when
``KS_TLS_CA_FILE`` is set. Which token a process presents:

- a service (``service_app`` calls :func:`use_service_identity`): the token named
  ``KS_AUTH_SERVICE_TOKEN`` (``service``) of its own token set, never KS_TOKEN;
- anything else (CLI, tests, benchmarks): ``--token`` (:func:`use_token`), else ``KS_TOKEN``,
  else the token named ``KS_AUTH_CLIENT_TOKEN`` (``admin``) of the tokens file (the one
  ``make up`` wrote into the run directory).

The same interceptors carry the current trace (``traceparent``, services/common/tracing.py) on
every call, so the services a request reaches stay on its trace.
"""

from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import load_tokens
from services.common.grpcserver import message_options
from services.common.retry import ShedBackoff
from services.common.settings import CommonSettings
from services.common.tls import channel_credentials, channel_options
from services.common.tracing import outgoing_metadata

T = TypeVar("T")
# A peer that restarts is dialled again within a second of answering: with gRPC's default
# reconnect backoff (1 s, growing 1.6x up to 120 s) infer answered 4.7 s after a Triton that
# had been down 13 s was ready (bench.chaos).
_RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def client_options(settings: CommonSettings) -> list[tuple[str, Any]]:
    """Options of every client channel, the Triton client's included: message limits, TLS name
    override (ignored on a plain channel), reconnection."""
    return [*message_options(settings), *channel_options(settings), *_RECONNECT_OPTIONS]


_service_identity = False
_token_override: str | None = None


def use_service_identity(on: bool = True) -> None:
    global _service_identity
    _service_identity = on


def use_token(secret: str | None) -> None:
    """The CLI's --token: what this process presents from now on (None = the default)."""
    global _token_override
    _token_override = secret


def client_token(settings: CommonSettings | None = None) -> str:
    """The secret this process presents ("" = none)."""
    # KS_AUTH is the servers' setting: a client shows its token whenever it has one (harmless
    # to a server with auth off, needed by one with auth on).
    settings = settings or CommonSettings()
    if not _service_identity:
        explicit = _token_override or settings.token.get_secret_value()
        if explicit:
            return explicit
    tokens = load_tokens(settings)
    name = settings.auth_service_token if _service_identity else settings.auth_client_token
    token = tokens.by_name(name) if tokens else None
    return token.secret if token else ""


def _with_token(metadata: Any, secret: str) -> list[tuple[str, Any]]:
    """Outgoing metadata: the token ("" = none) and the current trace."""
    rest = [(k, v) for k, v in (metadata or ()) if not secret or k.lower() != "authorization"]
    auth = [("authorization", f"Bearer {secret}")] if secret else []
    return outgoing_metadata([*rest, *auth])


class _Details(
    namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,
):
    pass


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, secret: str):
        self.secret = secret

    def _details(self, d: Any) -> _Details:
        metadata = _with_token(d.metadata, self.secret)
        ready = getattr(d, "wait_for_ready", None)
        return _Details(d.method, d.timeout, metadata, d.credentials, ready)

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


def _aio_details(d: grpc.aio.ClientCallDetails, secret: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*_with_token(d.metadata, secret))
    return grpc.aio.ClientCallDetails(
        d.method, d.timeout, metadata, d.credentials, d.wait_for_ready
    )


# grpc.aio files an interceptor under the first of the four kinds it is an instance of, so each
# kind needs its own class.
class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_aio_details(client_call_details, self.secret), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_aio_details(client_call_details, self.secret), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_aio_details(client_call_details, self.secret), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_aio_details(client_call_details, self.secret), request_iterator)


def channel(address: str, token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel; ``token``: the secret to present (None = this process's, "" = none)."""
    settings = CommonSettings()
    secret = client_token(settings) if token is None else token
    options = client_options(settings)
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    interceptors: list[Any] = [kind(secret) for kind in kinds]
    creds = channel_credentials(settings)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)


def sync_channel(address: str, token: str | None = None) -> grpc.Channel:
    """A blocking channel; ``token`` as for :func:`channel`."""
    settings = CommonSettings()
    secret = client_token(settings) if token is None else token
    options = client_options(settings)
    creds = channel_credentials(settings)
    chan = (
        grpc.insecure_channel(address, options=options)
        if creds is None
        else grpc.secure_channel(address, creds, options=options)
    )
    return grpc.intercept_channel(chan, _SyncToken(secret))


async def is_serving(chan: grpc.aio.Channel, service: str = "", timeout_s: float = 2.0) -> bool:
    try:
        reply = await health_pb2_grpc.HealthStub(chan).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def health_status(address: str, timeout_s: float = 2.0) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE, for status commands (health needs no token)."""
    with sync_channel(address, token="") as chan:
        try:
            reply = health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def patiently(call: Callable[[float], T], timeout_s: float) -> T:
    """Makes a unary call (``call(seconds_left)``) again while the server sheds it
    (RESOURCE_EXHAUSTED: the model's admission limit), with backoff, for up to ``timeout_s`` in
    all: for batch clients, such as an evaluation, that would rather wait for room than fail
    beside live traffic."""
    backoff = ShedBackoff(timeout_s)
    while True:
        try:
            return call(backoff.left())
        except grpc.RpcError as exc:
            shed = isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            wait = backoff.next_wait() if shed else None
            if wait is None:
                raise
        time.sleep(wait)
