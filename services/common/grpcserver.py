"""gRPC server wiring shared by every service: health, reflection, interceptors, readiness and
graceful shutdown.

A service builds a :class:`GrpcApp`, registers its servicer, adds readiness checks and
start/stop hooks, and awaits :meth:`GrpcApp.serve`. Health stays NOT_SERVING until every
readiness check passes, and flips back when one fails (a lost broker or Redis shows up in
``grpc.health.v1`` within one check interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.audit import AuditLog
from services.common.auth import server_tokens
from services.common.authz import AuthInterceptor
from services.common.errors import ServiceError
from services.common.logs import setup_logging
from services.common.metrics import RPC_LATENCY, start_metrics_server
from services.common.settings import CommonSettings
from services.common.tls import server_credentials
from services.common.tracing import server_context
from services.common.tracing import use as use_trace

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]
Hook = Callable[[], Awaitable[Any]]


def message_options(settings: CommonSettings) -> list[tuple[str, int]]:
    """Message size limits of every server and client (KS_GRPC_MAX_MESSAGE_BYTES): at most the
    broker's record limit, so whatever a service accepts it can also publish. A request above
    it gets gRPC's RESOURCE_EXHAUSTED; one under it that breaks a field cap gets our own
    INVALID_ARGUMENT naming the field."""
    size = settings.grpc_max_message_bytes
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


class _Undecodable:
    """Stands in for a request message that failed to parse (e.g. invalid UTF-8 in a string
    field), so the handler can answer INVALID_ARGUMENT instead of gRPC's generic INTERNAL."""

    def __init__(self, error: str):
        self.error = error


class _BadRequest(Exception):
    pass


def _tolerant(deserializer):  # type: ignore[no-untyped-def]
    def parse(data: bytes):  # type: ignore[no-untyped-def]
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


def _bad_request_message(error: str) -> str:
    return (
        f"request could not be decoded ({error}); string fields must be valid UTF-8 and "
        "the message must match the service's schema"
    )


class _ObservedMethod:
    """One method's wrapping, shared by the four RPC kinds: the caller's trace, the refusal of a
    request that could not be decoded, the latency metric with its status code, and the error
    contract (a ServiceError answers its code; anything else INTERNAL with a request id)."""

    def __init__(self, service: str, method: str):
        self.service = service
        self.method = method

    def observe(self, start: float, context: grpc.aio.ServicerContext) -> None:
        code = context.code() if hasattr(context, "code") else None
        name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        RPC_LATENCY.labels(self.service, self.method, name).observe(time.perf_counter() - start)

    async def answer_error(self, exc: Exception, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, _BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, ServiceError):
            await context.abort(exc.code, str(exc))
        request_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error in %s", self.method, extra={"request_id": request_id})
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error ({type(exc).__name__}): {exc} [request {request_id}]",
        )

    async def begin(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Each call runs on its caller's trace and refuses a request it could not decode."""
        use_trace(server_context(context.invocation_metadata()))
        if isinstance(request, _Undecodable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, _bad_request_message(request.error)
            )

    @staticmethod
    async def checked(request_iterator):  # type: ignore[no-untyped-def]
        async for request in request_iterator:
            if isinstance(request, _Undecodable):
                raise _BadRequest(_bad_request_message(request.error))
            yield request

    @contextlib.asynccontextmanager
    async def contract(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Around a handler: an escaped error is answered by answer_error, the call timed."""
        start = time.perf_counter()
        try:
            yield
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await self.answer_error(exc, context)
        finally:
            self.observe(start, context)

    async def guard(self, call: Awaitable[Any], context: grpc.aio.ServicerContext) -> Any:
        async with self.contract(context):
            return await call

    async def guard_stream(
        self, responses: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async with self.contract(context):
            if inspect.isasyncgen(responses):
                async for item in responses:
                    yield item
            else:  # a handler that writes with context.write
                await responses

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse, serialize = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):  # type: ignore[no-untyped-def]
                await self.begin(request, context)
                return await self.guard(inner_uu(request, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, parse, serialize)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):  # type: ignore[no-untyped-def]
                use_trace(server_context(context.invocation_metadata()))
                return await self.guard(inner_su(self.checked(request_iterator), context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, parse, serialize)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request, context):  # type: ignore[no-untyped-def]
                await self.begin(request, context)
                async for item in self.guard_stream(inner_us(request, context), context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, parse, serialize)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator, context):  # type: ignore[no-untyped-def]
                use_trace(server_context(context.invocation_metadata()))
                responses = inner_ss(self.checked(request_iterator), context)
                async for item in self.guard_stream(responses, context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, parse, serialize)
        return handler


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Times every RPC, labels it with its status code, turns unexpected exceptions into
    INTERNAL with a message instead of a bare UNKNOWN, and runs the handler under the caller's
    trace (``traceparent`` metadata; a new trace when it sent none). Each call is a task of its
    own, so the trace set here is seen by that call only."""

    def __init__(self, service: str):
        self.service = service

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return _ObservedMethod(self.service, method).wrap(handler)


class GrpcApp:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        grace_s: float = 5.0,
        settings: CommonSettings | None = None,
    ):
        self.name = name
        self.address = f"{host}:{port}"
        self.grace_s = grace_s
        self.settings = settings or CommonSettings()
        # Fails here, at start-up, when auth is on and no token set can be read.
        self.tokens = server_tokens(self.settings)
        self.audit = AuditLog(self.settings, name)
        # Observability outermost, so refused calls are timed and counted by code as well.
        self.server = grpc.aio.server(
            interceptors=[
                ObservabilityInterceptor(name),
                AuthInterceptor(name, self.tokens, self.audit),
            ],
            options=message_options(self.settings),
            # Load shedding: calls beyond this are answered RESOURCE_EXHAUSTED at once rather
            # than queued behind the ones running.
            maximum_concurrent_rpcs=self.settings.grpc_max_concurrent_rpcs,
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._checks: list[tuple[str, Check]] = []
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self.serving = False

    def add_service(self, full_name: str) -> None:
        """Names a registered service for reflection and per-service health."""
        self._service_names.append(full_name)

    def add_check(self, name: str, check: Check) -> None:
        self._checks.append((name, check))

    def on_start(self, hook: Hook) -> None:
        """Runs after the port is bound, before readiness checks: connect, load, subscribe."""
        self._on_start.append(hook)

    def on_stop(self, hook: Hook) -> None:
        """Runs after the server stopped taking calls, in reverse order of registration."""
        self._on_stop.append(hook)

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        """Runs a background task; its failure stops the service (a dead consumer must not hide
        behind a SERVING health status)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self._stopping.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed: %r; stopping", task.get_name(), exc, exc_info=exc)
            self._stopping.set()

    async def _set_status(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)
        if serving != self.serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving

    async def _readiness_loop(self, interval_s: float = 1.0) -> None:
        while not self._stopping.is_set():
            failed = []
            for name, check in self._checks:
                try:
                    ok = await asyncio.wait_for(check(), timeout=max(interval_s, 2.0))
                except Exception:
                    ok = False
                if not ok:
                    failed.append(name)
            if failed and self.serving:
                log.warning("dependencies not ready: %s", ", ".join(failed))
            await self._set_status(not failed)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=interval_s)
            except TimeoutError:
                pass

    async def start(self) -> int:
        """Binds and starts taking calls (health NOT_SERVING); returns the port bound."""
        reflection.enable_server_reflection(
            [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        creds = server_credentials(self.settings)
        port = (
            self.server.add_insecure_port(self.address)
            if creds is None
            else self.server.add_secure_port(self.address, creds)
        )
        if port == 0:
            raise RuntimeError(f"cannot bind {self.address}")
        await self._set_status(False)
        await self.server.start()
        self.spawn(self.audit.run(), "audit")
        if self.tokens is None:
            log.warning(
                "AUTH IS OFF (KS_AUTH=off): every RPC, admin ones included, is open to anyone "
                "who reaches %s",
                self.address,
            )
        log.info(
            "%s listening on %s (%s, auth %s)",
            self.name,
            self.address,
            "plaintext" if creds is None else "TLS",
            "off" if self.tokens is None else f"on, {len(self.tokens.tokens)} tokens",
        )
        return port

    async def serve(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            for hook in self._on_start:
                await hook()
            self.spawn(self._readiness_loop(), "readiness")
            await self._stopping.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        self._stopping.set()
        log.info("shutting down")
        await self._set_status(False)
        await self.server.stop(self.grace_s)
        await self.audit.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for hook in reversed(self._on_stop):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        log.info("stopped")


def service_app(name: str, settings: CommonSettings, port: int, metrics_port: int) -> GrpcApp:
    """What every service does first: logging, the metrics endpoint, and its gRPC app."""
    # Imported here: clients imports this module (message_options).
    from services.common.clients import use_service_identity

    setup_logging(name, settings.log_level, settings.log_format)
    start_metrics_server(metrics_port, settings.host)
    # Calls this service makes to others carry the service token, not a person's.
    use_service_identity()
    return GrpcApp(name, settings.host, port, settings.shutdown_grace_s, settings)
