"""TLS and mTLS handshakes against a tiny server built with the shared wiring, with a CA, a
server and a client certificate made here by the openssl command line."""

from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from services.common.clients import sync_channel
from services.common.settings import CommonSettings
from tests.utils.grpcapp import RunningApp, all_methods, call, stand_in_handlers

SECRET = "admin-secret-0123456789abcdef"
TOKENS = json.dumps({"tokens": [{"name": "admin", "role": "admin", "secret": SECRET}]})

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.pem", cwd=d,
    )  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            f"extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n",
            encoding="utf-8",
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=d,
        )  # fmt: skip
    return d


def _server(pki, mtls: bool) -> RunningApp:
    settings = CommonSettings(
        auth_tokens=SecretStr(TOKENS),
        kafka_bootstrap="127.0.0.1:9",
        tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key",
        tls_client_ca_file=pki / "ca.pem" if mtls else None,
    )

    def register(app):
        app.server.add_generic_rpc_handlers(stand_in_handlers([]))
        app.audit.record = lambda event: None  # no broker here

    return RunningApp(settings, register)


def _health(address: str) -> None:
    with sync_channel(address, token="") as chan:
        health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)


def _client_tls(monkeypatch, pki, with_cert: bool) -> None:
    monkeypatch.setenv("KS_TLS_CA_FILE", str(pki / "ca.pem"))
    if with_cert:
        monkeypatch.setenv("KS_TLS_CLIENT_CERT_FILE", str(pki / "client.pem"))
        monkeypatch.setenv("KS_TLS_CLIENT_KEY_FILE", str(pki / "client.key"))


def test_tls_handshake_and_a_call_with_a_token(pki, monkeypatch):
    server = _server(pki, mtls=False)
    try:
        with pytest.raises(grpc.RpcError) as err:  # a plaintext client gets nowhere
            _health(server.address)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        _client_tls(monkeypatch, pki, with_cert=False)
        _health(server.address)
        promote = next(m for m in all_methods() if m.name == "Promote")
        with sync_channel(server.address, token=SECRET) as chan:
            call(chan, promote)
    finally:
        server.close()


def test_mtls_refuses_a_client_without_a_certificate(pki, monkeypatch):
    server = _server(pki, mtls=True)
    try:
        _client_tls(monkeypatch, pki, with_cert=False)
        with pytest.raises(grpc.RpcError) as err:
            _health(server.address)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        _client_tls(monkeypatch, pki, with_cert=True)
        _health(server.address)
        promote = next(m for m in all_methods() if m.name == "Promote")
        with sync_channel(server.address, token=SECRET) as chan:
            call(chan, promote)
    finally:
        server.close()


def test_half_a_key_pair_is_refused(pki):
    with pytest.raises(ValueError, match="go together"):
        CommonSettings(tls_cert_file=pki / "server.pem")
    with pytest.raises(ValueError, match="mTLS"):
        CommonSettings(tls_client_ca_file=pki / "ca.pem")
