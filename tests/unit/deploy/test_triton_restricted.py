"""The embedded stack starts Triton with its model-repository and shared-memory APIs behind a
header only the stack knows (the key generated into the run directory), and the clients of
those APIs send it."""

from __future__ import annotations

import stat

from pydantic import SecretStr

from deploy.stack import triton_command
from services.common.auth import (
    ensure_triton_admin_key,
    triton_admin_headers,
    triton_admin_key,
)
from services.common.settings import CommonSettings


def test_tritonserver_is_started_with_the_restricted_apis(tmp_path):
    settings = CommonSettings(run_dir=tmp_path)
    assert triton_admin_key(settings) == "" and triton_admin_headers(settings) == {}
    cmd, _ = triton_command(settings, tmp_path)
    key = (tmp_path / "triton-admin.key").read_text(encoding="utf-8").strip()
    assert len(key) >= 32
    assert stat.S_IMODE((tmp_path / "triton-admin.key").stat().st_mode) == 0o600
    restricted = f"model-repository,shared-memory:ks-triton-admin={key}"
    assert f"--grpc-restricted-protocol={restricted}" in cmd
    assert f"--http-restricted-api={restricted}" in cmd
    # Generated once: the next start (and every client) uses the same key.
    assert ensure_triton_admin_key(settings) == key
    assert triton_admin_headers(settings) == {"triton-grpc-protocol-ks-triton-admin": key}
    assert triton_admin_headers(settings, "http") == {"ks-triton-admin": key}


def test_an_explicit_key_wins(tmp_path):
    settings = CommonSettings(run_dir=tmp_path, triton_admin_key=SecretStr("k" * 40))
    cmd, _ = triton_command(settings, tmp_path)
    assert not (tmp_path / "triton-admin.key").exists()
    assert any(a.endswith("ks-triton-admin=" + "k" * 40) for a in cmd)
