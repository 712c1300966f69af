"""A GrpcApp (the shared wiring: interceptors, TLS, health) serving on a background thread's
event loop, for tests with blocking clients; and stand-in handlers for every RPC of every
generated service."""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory

from services.common.auth import caller
from services.common.grpcserver import GrpcApp
from services.common.settings import CommonSettings

GEN = Path(__file__).resolve().parents[2] / "services" / "gen" / "knowstream"


def generated_services() -> Iterator[Any]:
    """Every service descriptor in services/gen/knowstream/*/v1/*_pb2.py."""
    for path in sorted(GEN.glob("*/v1/*_pb2.py")):
        module = importlib.import_module(f"knowstream.{path.parts[-3]}.v1.{path.stem}")
        yield from module.DESCRIPTOR.services_by_name.values()


def all_methods() -> list[Any]:
    return [m for service in generated_services() for m in service.methods]


def full_name(method: Any) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)


def stand_in_handlers(callers: list[str]) -> list[grpc.GenericRpcHandler]:
    """Each RPC answers an empty response (streams: one) and notes the caller's name."""
    handlers = []
    for service in generated_services():
        methods = {}
        for m in service.methods:
            out = message_class(m.output_type)
            de = message_class(m.input_type).FromString
            methods[m.name] = _handler(m, out, de, callers)
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


def _handler(m: Any, out: Any, de: Any, callers: list[str]) -> grpc.RpcMethodHandler:
    ser = out.SerializeToString
    if m.client_streaming and m.server_streaming:

        async def ss(requests, context):
            callers.append(caller())
            async for _ in requests:
                yield out()

        return grpc.stream_stream_rpc_method_handler(ss, de, ser)
    if m.client_streaming:

        async def su(requests, context):
            callers.append(caller())
            async for _ in requests:
                pass
            return out()

        return grpc.stream_unary_rpc_method_handler(su, de, ser)
    if m.server_streaming:

        async def us(request, context):
            callers.append(caller())
            yield out()

        return grpc.unary_stream_rpc_method_handler(us, de, ser)

    async def uu(request, context):
        callers.append(caller())
        return out()

    return grpc.unary_unary_rpc_method_handler(uu, de, ser)


def call(chan: grpc.Channel, method: Any, timeout: float = 10) -> Any:
    """Calls ``method`` with an empty request (streams: one message) on any RPC kind."""
    ser = message_class(method.input_type).SerializeToString
    de = message_class(method.output_type).FromString
    request = message_class(method.input_type)()
    path = full_name(method)
    if method.client_streaming and method.server_streaming:
        return list(chan.stream_stream(path, ser, de)(iter([request]), timeout=timeout))
    if method.client_streaming:
        return chan.stream_unary(path, ser, de)(iter([request]), timeout=timeout)
    if method.server_streaming:
        return list(chan.unary_stream(path, ser, de)(request, timeout=timeout))
    return chan.unary_unary(path, ser, de)(request, timeout=timeout)


class RunningApp:
    def __init__(self, settings: CommonSettings, register: Callable[[GrpcApp], None]):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> tuple[GrpcApp, int]:
            app = GrpcApp("test", "127.0.0.1", 0, 0.0, settings)
            register(app)
            return app, await app.start()

        self.app, self.port = asyncio.run_coroutine_threadsafe(make(), self.loop).result(30)
        self.address = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.app.shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
