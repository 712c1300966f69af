"""The ASGI app (FastAPI on uvicorn): thin routes that turn a request into one gRPC call of the
infer or embed service with the caller's bearer token, and its reply into OpenAI's shape.

Errors are raised, never answered in the routes: :class:`ApiError` (and gRPC errors, through
:func:`convert.from_rpc`), FastAPI's validation errors and unknown routes are all answered by
the handlers at the bottom in OpenAI's ``{"error": {...}}`` shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from knowstream.embed.v1 import embed_pb2, embed_pb2_grpc
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.auth import bearer
from services.common.clients import channel, is_serving
from services.common.logs import setup_logging
from services.common.tracing import TRACEPARENT, TraceContext, server_context
from services.openai_api import convert
from services.openai_api.convert import ApiError
from services.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
)
from services.openai_api.settings import OpenAISettings

log = logging.getLogger(__name__)
T = TypeVar("T")
Metadata = list[tuple[str, str]]


class Backend:
    """The stubs the routes call. The channels carry no token of this process: each call
    carries its HTTP caller's, so the services decide what that caller may do."""

    def __init__(self, settings: OpenAISettings):
        self.infer_channel = channel(settings.endpoint("infer"), token="")
        self.embed_channel = channel(settings.endpoint("embed"), token="")
        self.infer = infer_pb2_grpc.InferServiceStub(self.infer_channel)
        self.admin = infer_pb2_grpc.AdapterAdminServiceStub(self.infer_channel)
        self.embed = embed_pb2_grpc.EmbedServiceStub(self.embed_channel)

    async def ready(self) -> bool:
        checks = await asyncio.gather(
            is_serving(self.infer_channel), is_serving(self.embed_channel)
        )
        return all(checks)

    async def close(self) -> None:
        await self.infer_channel.close(None)
        await self.embed_channel.close(None)


def call_metadata(request: Request) -> Metadata:
    """What the gRPC call carries: the caller's bearer token, caller id (canary routing is
    sticky on it) and trace context, from the same headers a gRPC client sends."""
    out: Metadata = [(TRACEPARENT, request_trace(request).header())]
    secret = bearer([("authorization", request.headers.get("authorization", ""))])
    if secret:
        out.append(("authorization", f"Bearer {secret}"))
    if caller := request.headers.get("x-caller-id"):
        out.append(("x-caller-id", caller))
    return out


def request_trace(request: Request) -> TraceContext:
    """This request's hop of the caller's W3C trace (``traceparent``), or a new trace; set by
    the middleware, which returns it in the response's ``traceparent`` header."""
    ctx = getattr(request.state, "trace", None)
    if ctx is None:
        ctx = request.state.trace = server_context(
            [(TRACEPARENT, request.headers.get(TRACEPARENT, ""))]
        )
    return ctx  # type: ignore[no-any-return]


def backend_of(request: Request) -> Backend:
    return request.app.state.backend  # type: ignore[no-any-return]


BackendDep = Annotated[Backend, Depends(backend_of)]
MetadataDep = Annotated[Metadata, Depends(call_metadata)]


async def rpc(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.RpcError as exc:
        raise convert.from_rpc(exc) from exc


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


async def _events(
    first: Any, items: AsyncIterator[Any], body: GenerationRequest, chat: bool
) -> AsyncIterator[str]:
    chunk_id = convert.new_id("chatcmpl" if chat else "cmpl")
    created, model = int(time.time()), body.model
    if chat:  # OpenAI's first chunk names the role
        yield _sse(convert.chunk(chat, chunk_id, model, created, role=True))
    item = first
    while item.WhichOneof("kind") == "text":
        yield _sse(convert.chunk(chat, chunk_id, model, created, text=item.text))
        # Not a bare anext(): StopAsyncIteration inside an async generator is a RuntimeError.
        item = await anext(items, None)
        if item is None:
            raise ApiError(502, "the stream ended without a final answer", "server_error")
    yield _sse(convert.chunk(chat, chunk_id, model, created, final=item.final))
    if body.stream_options and body.stream_options.include_usage:
        yield _sse(convert.usage_chunk(chat, chunk_id, model, created, item.final))


async def stream_answer(
    backend: Backend,
    request: infer_pb2.AskRequest,
    md: Metadata,
    body: GenerationRequest,
    timeout_s: float,
    chat: bool,
) -> Response:
    """AskStream as server-sent events. The first message is awaited before the response
    starts, so what fails before any text (auth, validation, routing, retrieval) gets its own
    HTTP status; a later failure becomes an error event, then ``[DONE]``."""
    call = backend.infer.AskStream(request, metadata=md, timeout=timeout_s)
    items = aiter(call)

    def cancel() -> None:
        if hasattr(call, "cancel"):
            call.cancel()

    try:
        first = await anext(items)
    except grpc.RpcError as exc:
        cancel()
        raise convert.from_rpc(exc) from exc
    except StopAsyncIteration:
        raise ApiError(
            502, "the infer service ended the stream without an answer", "server_error"
        ) from None

    async def events() -> AsyncIterator[str]:
        try:
            async for event in _events(first, items, body, chat):
                yield event
        except grpc.RpcError as exc:
            yield _sse(convert.from_rpc(exc).body())
        except ApiError as exc:
            yield _sse(exc.body())
        finally:
            cancel()  # when the client went away, generation stops (a no-op once done)
        yield _sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def create_app(
    settings: OpenAISettings, make_backend: Callable[[], Backend] | None = None
) -> FastAPI:
    """The app; ``make_backend`` replaces the gRPC stubs (unit tests pass fakes)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Made inside the server's event loop: grpc.aio channels belong to the loop they are
        # made in.
        app.state.backend = (make_backend or (lambda: Backend(settings)))()
        yield
        await app.state.backend.close()

    app = FastAPI(
        title="knowstream OpenAI-compatible API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.middleware("http")(trace_context)
    add_generation_routes(app, settings)
    add_model_routes(app, settings)
    add_embedding_routes(app, settings)
    app.get("/health")(health)
    add_error_handlers(app)
    return app


async def trace_context(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    # The trace id a client can follow with `knowstream trace ID` (events on every topic).
    ctx = request_trace(request)
    response = await call_next(request)
    response.headers[TRACEPARENT] = ctx.header()
    return response


async def health(b: BackendDep) -> JSONResponse:
    """SERVING while the infer and embed services are (no token needed, like gRPC health)."""
    ok = await b.ready()
    return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, 200 if ok else 503)


def add_generation_routes(app: FastAPI, settings: OpenAISettings) -> None:
    """/v1/chat/completions and /v1/completions: an Ask each, whole or streamed."""
    timeout = settings.openai_timeout_s
    routed, base = settings.openai_model_name, convert.base_name(settings.llm_model)

    async def answer(
        backend: Backend, body: GenerationRequest, question: str, md: Metadata, chat: bool
    ) -> Any:
        adapter = convert.adapter_for(body.model, routed, base)
        request = convert.ask_request(body, question, adapter)
        if body.stream:
            return await stream_answer(backend, request, md, body, timeout, chat)
        response = await rpc(backend.infer.Ask(request, metadata=md, timeout=timeout))
        return convert.completion(response, body.model, int(time.time()), chat)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, b: BackendDep, md: MetadataDep) -> Any:
        return await answer(b, body, convert.chat_question(body), md, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, b: BackendDep, md: MetadataDep) -> Any:
        return await answer(b, body, convert.completion_question(body), md, chat=False)


def add_model_routes(app: FastAPI, settings: OpenAISettings) -> None:
    """/v1/models: the base model, every registered adapter and the routing aliases."""
    timeout = settings.openai_timeout_s
    routed, base = settings.openai_model_name, convert.base_name(settings.llm_model)

    async def model_list(b: Backend, md: Metadata) -> dict[str, Any]:
        adapters, info = await asyncio.gather(
            rpc(
                b.admin.ListAdapters(infer_pb2.ListAdaptersRequest(), metadata=md, timeout=timeout)
            ),
            rpc(
                b.embed.GetModelInfo(embed_pb2.GetModelInfoRequest(), metadata=md, timeout=timeout)
            ),
        )
        return convert.models(adapters, routed, base, convert.base_name(info.model))

    @app.get("/v1/models")
    async def models(b: BackendDep, md: MetadataDep) -> dict[str, Any]:
        return await model_list(b, md)

    @app.get("/v1/models/{model:path}")
    async def model(model: str, b: BackendDep, md: MetadataDep) -> dict[str, Any]:
        for entry in (await model_list(b, md))["data"]:
            if entry["id"] == model:
                return entry  # type: ignore[no-any-return]
        raise ApiError(404, f"unknown model {model!r}", param="model", code="model_not_found")


def add_embedding_routes(app: FastAPI, settings: OpenAISettings) -> None:
    timeout = settings.openai_timeout_s

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, b: BackendDep, md: MetadataDep) -> Any:
        if body.dimensions is not None:
            raise ApiError(400, "dimensions is not supported", param="dimensions")
        texts = [body.input] if isinstance(body.input, str) else body.input
        reply = await rpc(
            b.embed.Embed(embed_pb2.EmbedRequest(texts=texts), metadata=md, timeout=timeout)
        )
        served = convert.base_name(reply.model)
        if body.model != served:  # checked after the call, so that auth is answered first
            raise ApiError(
                404,
                f"unknown embedding model {body.model!r}; this service embeds with {served!r}",
                param="model",
                code="model_not_found",
            )
        return convert.embeddings(reply, body.model, body.encoding_format)


def add_error_handlers(app: FastAPI) -> None:
    def reply(error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return reply(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":  # its loc is a character position
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            where = []
        elif not where and first.get("type") in ("model_attributes_type", "dict_type"):
            message = "the body must be a JSON object (Content-Type: application/json)"
        param = ".".join(where) or None
        return reply(ApiError(400, f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return reply(ApiError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return reply(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))


def uvicorn_config(app: FastAPI, settings: OpenAISettings) -> uvicorn.Config:
    """Bound like the gRPC servers: KS_HOST, and TLS (mTLS with a client CA) from the same
    certificate settings."""
    tls: dict[str, Any] = {}
    if settings.tls_cert_file is not None:
        tls = {
            "ssl_certfile": str(settings.tls_cert_file),
            "ssl_keyfile": str(settings.tls_key_file),
        }
        if settings.tls_client_ca_file is not None:
            tls |= {
                "ssl_ca_certs": str(settings.tls_client_ca_file),
                "ssl_cert_reqs": ssl.CERT_REQUIRED,
            }
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.openai_port,
        log_config=None,  # the service's JSON logging (setup_logging) handles uvicorn's loggers
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        **tls,
    )


def main() -> None:
    settings = OpenAISettings()
    setup_logging("openai", settings.log_level, settings.log_format)
    if settings.openai_port == 0:
        log.warning("KS_OPENAI_PORT is 0: the OpenAI-compatible API is off")
        return
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
