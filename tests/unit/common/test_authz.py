"""The server interceptor over the shared wiring: every RPC of every generated service x {no
token, unknown token, reader, writer, admin}, all four RPC kinds, the caller's name, the audit
trail, fail-closed methods and auth off."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from services.common import roles
from services.common.auth import Role
from services.common.clients import sync_channel
from services.common.settings import CommonSettings
from tests.utils.grpcapp import RunningApp, all_methods, call, full_name, stand_in_handlers

SECRETS = {name: f"{name}-secret-0123456789abcdef" for name in ("reader", "writer", "admin")}
TOKENS = json.dumps({"tokens": [{"name": n, "role": n, "secret": s} for n, s in SECRETS.items()]})
METHODS = all_methods()
CHAT = "/knowstream.test.v1.Echo/Chat"  # a stream-stream RPC no generated service has (yet)


def _settings(**kw) -> CommonSettings:
    # A broker nobody listens on: the audit sender must never be needed by these tests.
    return CommonSettings(auth_tokens=SecretStr(TOKENS), kafka_bootstrap="127.0.0.1:9", **kw)


def _echo() -> grpc.GenericRpcHandler:
    async def chat(requests, context):
        async for request in requests:
            yield request

    identity = bytes
    handler = grpc.stream_stream_rpc_method_handler(chat, identity, identity)
    return grpc.method_handlers_generic_handler("knowstream.test.v1.Echo", {"Chat": handler})


@pytest.fixture(scope="module")
def server():
    callers: list[str] = []
    audited: list = []

    def register(app):
        app.server.add_generic_rpc_handlers([*stand_in_handlers(callers), _echo()])
        app.audit.record = audited.append  # what would be published on ks.audit

    running = RunningApp(_settings(), register)
    running.callers, running.audited = callers, audited
    yield running
    running.close()


def _code(server, method, token: str | None) -> grpc.StatusCode:
    with sync_channel(server.address, token=token or "") as chan:
        try:
            call(chan, method)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("who", ["none", "unknown", "reader", "writer", "admin"])
@pytest.mark.parametrize("method", METHODS, ids=full_name)
def test_every_rpc_answers_by_role(server, method, who):
    token = {"none": "", "unknown": "not-a-token-0123456789"}.get(who, SECRETS.get(who))
    code = _code(server, method, token)
    needed = roles.required_role(full_name(method))
    if who in ("none", "unknown"):
        assert code == grpc.StatusCode.UNAUTHENTICATED
    elif Role.parse(who) >= needed:
        assert code == grpc.StatusCode.OK
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_refusals_name_the_role_needed(server):
    promote = next(m for m in METHODS if m.name == "Promote")
    with (
        sync_channel(server.address, token=SECRETS["writer"]) as chan,
        pytest.raises(grpc.RpcError) as err,
    ):
        call(chan, promote)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs role admin" in err.value.details() and "'writer'" in err.value.details()
    with sync_channel(server.address, token="") as chan, pytest.raises(grpc.RpcError) as err:
        call(chan, promote)
    assert "Bearer" in err.value.details()


def test_health_and_reflection_need_no_token(server):
    with sync_channel(server.address, token="") as chan:
        health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
        replies = reflection_pb2_grpc.ServerReflectionStub(chan).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        assert "grpc.health.v1.Health" in {
            s.name for r in replies for s in r.list_services_response.service
        }


def test_the_caller_name_reaches_the_handler(server):
    ask = next(m for m in METHODS if m.name == "AskStream")
    server.callers.clear()
    with sync_channel(server.address, token=SECRETS["reader"]) as chan:
        call(chan, ask)
    assert server.callers == ["reader"]


def test_a_method_without_a_role_is_refused_even_to_admin(server):
    with sync_channel(server.address, token=SECRETS["admin"]) as chan:
        chat = chan.stream_stream(CHAT)
        with pytest.raises(grpc.RpcError) as err:
            list(chat(iter([b"hi"]), timeout=5))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no role defined" in err.value.details()


def test_stream_stream_rpcs_are_covered(server, monkeypatch):
    monkeypatch.setitem(roles.METHOD_ROLES, CHAT, Role.WRITER)
    for token, expected in (
        ("", grpc.StatusCode.UNAUTHENTICATED),
        (SECRETS["reader"], grpc.StatusCode.PERMISSION_DENIED),
        (SECRETS["writer"], None),
    ):
        with sync_channel(server.address, token=token) as chan:
            chat = chan.stream_stream(CHAT)
            if expected is None:
                assert list(chat(iter([b"a", b"b"]), timeout=5)) == [b"a", b"b"]
                continue
            with pytest.raises(grpc.RpcError) as err:
                list(chat(iter([b"a"]), timeout=5))
            assert err.value.code() == expected


def test_admin_rpcs_are_audited_refused_ones_too(server):
    upload = next(m for m in METHODS if m.name == "UploadAdapter")
    search = next(m for m in METHODS if m.name == "Search")
    server.audited.clear()
    for token in (SECRETS["admin"], SECRETS["reader"], ""):
        _code(server, upload, token)
    _code(server, search, SECRETS["reader"])  # reads are not audited
    assert [(e.who, e.role, e.code) for e in server.audited] == [
        ("admin", "admin", "OK"),
        ("reader", "reader", "PERMISSION_DENIED"),
        ("", "", "UNAUTHENTICATED"),
    ]
    first = server.audited[0]
    assert first.method == full_name(upload) and first.service == "test"
    assert first.request.startswith("stream of 1 messages") and first.started_at_ms > 0
    assert "needs role admin" in server.audited[1].details and first.peer


def test_auth_off_admits_everyone_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        audited: list = []

        def register(app):
            app.server.add_generic_rpc_handlers(stand_in_handlers([]))
            app.audit.record = audited.append

        running = RunningApp(_settings(auth="off"), register)
    try:
        promote = next(m for m in METHODS if m.name == "Promote")
        assert _code(running, promote, "") == grpc.StatusCode.OK
        assert any("AUTH IS OFF" in r.getMessage() for r in caplog.records)
        assert [(e.who, e.code) for e in audited] == [("anonymous", "OK")]
    finally:
        running.close()
