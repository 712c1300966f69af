"""The server interceptor that authenticates every RPC, enforces its role and audits admin RPCs.

One place for all four RPC kinds: the method's own handler is fetched first, then replaced by a
refusal or wrapped, keeping its kind and (de)serializers. The order of checks is: health and
reflection pass untouched; no or an unknown bearer token is UNAUTHENTICATED; a method without a
role in services/common/roles.py, or a role above the token's, is PERMISSION_DENIED naming the
role needed. Admitted calls run with the token's name in :data:`services.common.auth.CALLER`
and the access groups it may read in :data:`services.common.auth.CALLER_SCOPE`.
Every call of a method that needs admin (or has no role) becomes an AuditEvent, refused ones
included: probing the control plane is worth knowing about.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from knowstream.events.v1 import events_pb2
from services.common.audit import AuditLog, summarize
from services.common.auth import CALLER, CALLER_SCOPE, Role, Token, TokenSet, bearer
from services.common.kafka import new_header
from services.common.roles import is_open, required_role

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the caller's name with auth off


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, token: Token | None = None):
        # The token shown, when it is a known one: the audit records who was refused.
        self.code, self.message, self.token = code, message, token


class _StreamSummary:
    """Counts the request messages of a client stream for the audit summary."""

    def __init__(self, requests: AsyncIterator[Any]):
        self.requests, self.count, self.size, self.first = requests, 0, 0, ""

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        async for request in self.requests:
            if self.count == 0 and hasattr(request, "ListFields"):
                self.first = summarize(request, 300)
            self.count += 1
            self.size += request.ByteSize() if hasattr(request, "ByteSize") else 0
            yield request

    def __str__(self) -> str:
        return f"stream of {self.count} messages ({self.size} bytes); first: {self.first}"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, tokens: TokenSet | None, audit: AuditLog | None):
        self.service, self.tokens, self.audit = service, tokens, audit

    def check(self, method: str, metadata: Any) -> tuple[Token | None, Role | None]:
        """The caller's token and the role needed; raises _Refusal when the call may not run."""
        needed = required_role(method)
        if self.tokens is None:
            return None, needed
        token = self.tokens.authenticate(bearer(metadata))
        if token is None:
            raise _Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown token: send 'authorization: Bearer <secret>' (the CLI reads "
                "<run dir>/tokens.json, or --token / KS_TOKEN)",
            )
        if needed is None:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} has no role defined (services/common/roles.py): refused to everyone",
                token,
            )
        if token.role < needed:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs role {needed.label}; token {token.name!r} has role "
                f"{token.role.label}",
                token,
            )
        return token, needed

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_open(method):
            return handler
        token: Token | None = None
        needed: Role | None = None
        refusal: _Refusal | None = None
        try:
            token, needed = self.check(method, handler_call_details.invocation_metadata)
        except _Refusal as exc:
            refusal, token, needed = exc, exc.token, required_role(method)
        audited = self.audit is not None and (needed is None or needed >= Role.ADMIN)
        call = _AuthorizedCall(
            self.service,
            method,
            token,
            anonymous=self.tokens is None,
            refusal=refusal,
            audit=self.audit if audited else None,
        )
        return _rebuild(handler, call.run, call.run_stream)


class _AuthorizedCall:
    """One call past the token check: refused (and audited) or run with the caller set, then
    audited with its outcome when the method needs admin."""

    def __init__(
        self,
        service: str,
        method: str,
        token: Token | None,
        *,
        anonymous: bool,
        refusal: _Refusal | None,
        audit: AuditLog | None,
    ):
        self.service, self.method, self.refusal, self.audit = service, method, refusal, audit
        self.who = token.name if token else (ANONYMOUS if anonymous else "")
        self.role = token.role.label if token else ""
        # The document access groups the call may read (None = all: auth off or a "*" token).
        self.scope = token.scope if token else None
        self.started = time.time()

    def record(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        request: Any,
        details: str | bytes | None = None,
    ) -> None:
        if self.audit is None:
            return
        if details is None:
            details = context.details() if code != grpc.StatusCode.OK else ""
        self.audit.record(
            events_pb2.AuditEvent(
                header=new_header(self.service),
                who=self.who,
                role=self.role,
                method=self.method,
                service=self.service,
                request=str(request)
                if isinstance(request, _StreamSummary)
                else (summarize(request) if hasattr(request, "ListFields") else ""),
                code=code.name,
                details=details.decode() if isinstance(details, bytes) else details or "",
                started_at_ms=int(self.started * 1000),
                duration_ms=(time.time() - self.started) * 1000,
                peer=context.peer() or "",
            )
        )

    async def _admit(self, context: Any, request: Any) -> None:
        if self.refusal is not None:
            self.record(context, self.refusal.code, request, self.refusal.message)
            await context.abort(self.refusal.code, self.refusal.message)
        CALLER.set(self.who)
        CALLER_SCOPE.set(self.scope)

    async def run(self, call: Callable[[], Any], context: Any, request: Any) -> Any:
        """Runs a unary-response call (or refuses it) with the caller set, then audits."""
        await self._admit(context, request)
        try:
            result = await call()
        except BaseException as exc:
            self.record(context, _code_of(exc, context), request)
            raise
        self.record(context, context.code() or grpc.StatusCode.OK, request)
        return result

    async def run_stream(self, call: Callable[[], Any], context: Any, request: Any) -> Any:
        await self._admit(context, request)
        try:
            responses = call()
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:  # a handler writing with context.write()
                await responses
        except BaseException as exc:
            self.record(context, _code_of(exc, context), request)
            raise
        self.record(context, context.code() or grpc.StatusCode.OK, request)


def _code_of(exc: BaseException, context: Any) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[no-any-return]
    return grpc.StatusCode.INTERNAL  # the observability interceptor answers INTERNAL for it


def _rebuild(handler: grpc.RpcMethodHandler, run: Any, run_stream: Any) -> grpc.RpcMethodHandler:
    """The same kind of handler as ``handler``, its behaviour passed through ``run``."""
    de, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        uu = handler.unary_unary

        async def unary_unary(request, context):  # type: ignore[no-untyped-def]
            return await run(lambda: uu(request, context), context, request)

        return grpc.unary_unary_rpc_method_handler(unary_unary, de, ser)
    if handler.unary_stream:
        us = handler.unary_stream

        async def unary_stream(request, context):  # type: ignore[no-untyped-def]
            async for response in run_stream(lambda: us(request, context), context, request):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, de, ser)
    if handler.stream_unary:
        su = handler.stream_unary

        async def stream_unary(requests, context):  # type: ignore[no-untyped-def]
            counted = _StreamSummary(requests)
            return await run(lambda: su(counted.__aiter__(), context), context, counted)

        return grpc.stream_unary_rpc_method_handler(stream_unary, de, ser)
    ss = handler.stream_stream
    assert ss is not None  # the fourth kind

    async def stream_stream(requests, context):  # type: ignore[no-untyped-def]
        counted = _StreamSummary(requests)
        async for response in run_stream(
            lambda: ss(counted.__aiter__(), context), context, counted
        ):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, de, ser)
