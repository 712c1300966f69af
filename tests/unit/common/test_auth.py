"""Tokens: parsing, the generated file, constant-time lookup, and which token a client shows."""

from __future__ import annotations

import json
import stat

import pytest
from pydantic import SecretStr

from services.common import clients
from services.common.auth import (
    Role,
    TokenError,
    bearer,
    ensure_tokens_file,
    load_tokens,
    parse_tokens,
    server_tokens,
)
from services.common.settings import CommonSettings

SECRET = "s" * 24


def tokens_json(**roles: str) -> str:
    return json.dumps(
        {"tokens": [{"name": n, "role": r, "secret": f"{n}-{SECRET}"} for n, r in roles.items()]}
    )


def test_roles_are_ordered_and_parsed():
    assert Role.READER < Role.WRITER < Role.ADMIN
    assert Role.parse(" Admin ") == Role.ADMIN
    with pytest.raises(ValueError, match="unknown role"):
        Role.parse("root")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("not json", "not JSON"),
        ("{}", "expected"),
        ('[{"name": "a", "role": "admin"}]', "needs string"),
        ('[{"name": "a", "role": "admin", "secret": "short"}]', "secret under"),
        (f'[{{"name": "a", "role": "god", "secret": "{SECRET}"}}]', "unknown role"),
        (
            f'[{{"name": "a", "role": "admin", "secret": "{SECRET}"}},'
            f' {{"name": "a", "role": "reader", "secret": "x{SECRET}"}}]',
            "unique",
        ),
        (
            f'[{{"name": "a", "role": "admin", "secret": "{SECRET}"}},'
            f' {{"name": "b", "role": "reader", "secret": "{SECRET}"}}]',
            "share a secret",
        ),
    ],
)
def test_malformed_token_sets_are_refused(raw, error):
    with pytest.raises(TokenError, match=error):
        parse_tokens(raw, "test")


def test_authenticate_finds_the_token_by_secret_only():
    tokens = parse_tokens(tokens_json(admin="admin", reader="reader"), "test")
    assert tokens.authenticate(f"reader-{SECRET}").name == "reader"
    assert tokens.authenticate(f"reader-{SECRET}x") is None
    assert tokens.authenticate("") is None
    assert "secret" not in repr(tokens.by_name("admin"))  # never in logs or tracebacks


def test_bearer_metadata():
    assert bearer([("authorization", "Bearer abc")]) == "abc"
    assert bearer((("Authorization", b"bearer  xyz "),)) == "xyz"
    assert bearer([("authorization", "Basic abc")]) == ""
    assert bearer(None) == ""


def test_make_up_writes_tokens_once_with_mode_0600(tmp_path):
    path = tmp_path / "run" / "tokens.json"
    assert ensure_tokens_file(path)
    first = path.read_text(encoding="utf-8")
    assert not ensure_tokens_file(path) and path.read_text(encoding="utf-8") == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tokens = parse_tokens(first, str(path))
    assert {(t.name, t.role) for t in tokens.tokens} == {
        ("admin", Role.ADMIN),
        ("writer", Role.WRITER),
        ("reader", Role.READER),
        ("service", Role.ADMIN),
    }


def test_inline_tokens_win_over_the_file_and_auth_needs_tokens(tmp_path):
    ensure_tokens_file(tmp_path / "tokens.json")
    from_file = CommonSettings(run_dir=tmp_path)
    assert load_tokens(from_file).by_name("service") is not None
    inline = CommonSettings(run_dir=tmp_path, auth_tokens=SecretStr(tokens_json(ops="admin")))
    assert [t.name for t in load_tokens(inline).tokens] == ["ops"]
    with pytest.raises(TokenError, match="KS_AUTH=off"):
        server_tokens(CommonSettings(run_dir=tmp_path / "empty"))
    assert server_tokens(CommonSettings(run_dir=tmp_path / "empty", auth="off")) is None


def test_which_token_a_process_presents(tmp_path, monkeypatch):
    ensure_tokens_file(tmp_path / "tokens.json")
    tokens = load_tokens(CommonSettings(run_dir=tmp_path))
    monkeypatch.setenv("KS_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("KS_TOKEN", raising=False)
    assert clients.client_token() == tokens.by_name("admin").secret
    monkeypatch.setenv("KS_TOKEN", "from-env")
    assert clients.client_token() == "from-env"
    clients.use_token("from-flag")
    try:
        assert clients.client_token() == "from-flag"
    finally:
        clients.use_token(None)
    clients.use_service_identity()
    try:  # a service presents its own token, whatever KS_TOKEN says
        assert clients.client_token() == tokens.by_name("service").secret
    finally:
        clients.use_service_identity(False)
    monkeypatch.delenv("KS_TOKEN")
    monkeypatch.setenv("KS_RUN_DIR", str(tmp_path / "elsewhere"))
    assert clients.client_token() == ""  # no tokens anywhere: calls go without one
