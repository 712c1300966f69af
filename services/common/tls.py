"""TLS for every gRPC server and client, from settings; plaintext when none are set (the local
default: everything binds to 127.0.0.1).

- servers: ``KS_TLS_CERT_FILE`` + ``KS_TLS_KEY_FILE``; with ``KS_TLS_CLIENT_CA_FILE`` they also
  require a client certificate signed by that CA (mTLS);
- clients (the CLI, service-to-service channels): ``KS_TLS_CA_FILE`` turns TLS on and is what
  server certificates are verified against; ``KS_TLS_CLIENT_CERT_FILE`` + ``_KEY_FILE`` are
  presented for mTLS; ``KS_TLS_SERVER_NAME`` overrides the name checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from services.common.settings import CommonSettings


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key, cert = settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes()
    client_ca = _read(settings.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(settings: CommonSettings) -> grpc.ChannelCredentials | None:
    if settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=_read(settings.tls_client_key_file),
        certificate_chain=_read(settings.tls_client_cert_file),
    )


def channel_options(settings: CommonSettings) -> list[tuple[str, Any]]:
    if settings.tls_ca_file is not None and settings.tls_server_name:
        return [("grpc.ssl_target_name_override", settings.tls_server_name)]
    return []
