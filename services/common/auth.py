"""Bearer tokens and roles: what a token is, where the set of accepted tokens comes from, and
who the current caller is.

A token has a name (what the audit trail records), a role and a secret. Roles are ordered:
``reader`` < ``writer`` < ``admin``; which RPC needs which role is in
:mod:`services.common.roles`, and :mod:`services.common.authz` enforces it. The token set is
JSON, ``{"tokens": [{"name": ..., "role": ..., "secret": ..., "groups": [...]}, ...]}`` (a bare
list works too), read from ``KS_AUTH_TOKENS`` (inline, for compose/k8s secrets) or else from
``KS_AUTH_TOKENS_FILE`` (default ``<run dir>/tokens.json``, which ``make up`` writes once with
mode 0600).

``groups`` (optional) are the document access groups the token may read besides public
documents (:mod:`services.common.access`); ``"*"`` reads every group. Without it an admin token
reads every group (the services' own token is admin: the trainer and the infer service search
on everything, infer narrowing each search to its caller's groups) and a reader or writer token
only public documents.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from services.common.access import ALL, InvalidGroups, Scope, parse_groups, token_scope
from services.common.settings import CommonSettings

# Shorter secrets are refused: a guessable token is no token.
MIN_SECRET_CHARS = 16
# The tokens `make up` generates: one per role, and the one services present to each other.
DEFAULT_TOKENS = (("admin", "admin"), ("writer", "writer"), ("reader", "reader"))
SERVICE_TOKEN = "service"

# The name of the token the current RPC was authenticated with ("" outside an RPC or with
# auth off), set by the server interceptor so that services can record who did what.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("ks_caller", default="")
# The access groups that token may read (None = every group: auth off, a "*" token, or code
# running outside an RPC), set by the interceptor beside CALLER.
CALLER_SCOPE: contextvars.ContextVar[Scope] = contextvars.ContextVar("ks_scope", default=None)


def caller() -> str:
    return CALLER.get()


def caller_scope() -> Scope:
    return CALLER_SCOPE.get()


class Role(enum.IntEnum):
    READER = 1
    WRITER = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown role {name!r}; roles are {', '.join(r.label for r in cls)}"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


class TokenError(ValueError):
    """The token set is missing or malformed: the service must not start."""


@dataclass(frozen=True)
class Token:
    name: str
    role: Role
    secret: str = field(repr=False)
    # Access groups it may read; None = the role's default (admin: all; else: public only).
    groups: frozenset[str] | None = None

    @property
    def scope(self) -> Scope:
        """What the token may read: None = every group, else these groups and public ones."""
        if self.groups is None:
            return None if self.role >= Role.ADMIN else frozenset()
        return token_scope(self.groups)


class TokenSet:
    def __init__(self, tokens: list[Token]):
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise TokenError("token names must be unique")
        if len({t.secret for t in tokens}) != len(tokens):
            raise TokenError("two tokens share a secret")
        self.tokens = tokens
        self._secrets = [(t, t.secret.encode()) for t in tokens]

    def authenticate(self, secret: str) -> Token | None:
        """The token with this secret. Every secret is compared, in constant time each, so the
        time taken says nothing about which (or how much of one) matched."""
        offered = secret.encode()
        found = None
        for token, expected in self._secrets:
            if hmac.compare_digest(offered, expected):
                found = token
        return found

    def by_name(self, name: str) -> Token | None:
        return next((t for t in self.tokens if t.name == name), None)

    def to_json(self, indent: int | None = 2) -> str:
        rows: list[dict[str, object]] = []
        for t in self.tokens:
            row: dict[str, object] = {"name": t.name, "role": t.role.label, "secret": t.secret}
            if t.groups is not None:
                row["groups"] = sorted(t.groups)
            rows.append(row)
        return json.dumps({"tokens": rows}, indent=indent)


def parse_tokens(raw: str, where: str) -> TokenSet:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenError(f"{where}: not JSON ({exc})") from None
    rows = data.get("tokens") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise TokenError(f"{where}: expected {{'tokens': [{{name, role, secret}}, ...]}}")
    tokens = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("name", "role", "secret")
        ):
            raise TokenError(f"{where}: token {n} needs string name, role and secret")
        if len(row["secret"]) < MIN_SECRET_CHARS:
            raise TokenError(f"{where}: token {row['name']!r}: secret under {MIN_SECRET_CHARS}")
        try:
            role = Role.parse(row["role"])
        except ValueError as exc:
            raise TokenError(f"{where}: token {row['name']!r}: {exc}") from None
        groups = None
        if "groups" in row:
            if not isinstance(row["groups"], list):
                raise TokenError(f"{where}: token {row['name']!r}: groups must be a list")
            try:
                groups = parse_groups(row["groups"], allow_all=True)
            except InvalidGroups as exc:
                raise TokenError(f"{where}: token {row['name']!r}: {exc}") from None
            if ALL in groups and len(groups) > 1:
                raise TokenError(f"{where}: token {row['name']!r}: '*' with other groups")
        tokens.append(Token(row["name"], role, row["secret"], groups))
    try:
        return TokenSet(tokens)
    except TokenError as exc:
        raise TokenError(f"{where}: {exc}") from None


# (path, mtime_ns, size) -> tokens: clients open many channels; the file is read once.
_file_cache: dict[tuple[str, int, int], TokenSet] = {}


def load_tokens(settings: CommonSettings) -> TokenSet | None:
    """The token set from KS_AUTH_TOKENS or the tokens file; None when neither exists."""
    inline = settings.auth_tokens.get_secret_value()
    if inline.strip():
        return parse_tokens(inline, "KS_AUTH_TOKENS")
    path = settings.tokens_file()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _file_cache:
        _file_cache.clear()
        _file_cache[key] = parse_tokens(path.read_text(encoding="utf-8"), str(path))
    return _file_cache[key]


def server_tokens(settings: CommonSettings) -> TokenSet | None:
    """What a server checks callers against: None only with an explicit KS_AUTH=off."""
    if settings.auth == "off":
        return None
    tokens = load_tokens(settings)
    if tokens is None:
        raise TokenError(
            f"auth is on and there are no tokens: neither KS_AUTH_TOKENS nor "
            f"{settings.tokens_file()} (KS_AUTH_TOKENS_FILE) exists. `make up` generates that "
            "file; KS_AUTH=off runs without authentication, on purpose only."
        )
    return tokens


def new_token_set() -> TokenSet:
    tokens = [Token(name, Role.parse(role), _secret()) for name, role in DEFAULT_TOKENS]
    tokens.append(Token(SERVICE_TOKEN, Role.ADMIN, _secret()))
    return TokenSet(tokens)


def _secret() -> str:
    # The prefix makes a leaked token easy to find in logs and scanners.
    return "ks_" + secrets.token_urlsafe(32)


def create_secret_file(path: Path, text: str) -> bool:
    """Writes ``text`` to a new file at ``path``, mode 0600 from the start; False (and nothing
    written) when one is there. Created exclusively, so two `make up` at once cannot both write
    (and disagree)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def ensure_tokens_file(path: Path) -> bool:
    """Writes a new token set to ``path`` (mode 0600) unless one is there; True when written."""
    return create_secret_file(path, new_token_set().to_json() + "\n")


def bearer(metadata: object) -> str:
    """The secret of an ``authorization: Bearer <secret>`` entry of call metadata, or ""."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, secret = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                return secret.strip()
    return ""


# Triton's model-repository and shared-memory APIs answer only requests that carry this header
# with the stack's key (tritonserver --grpc-restricted-protocol / --http-restricted-api); over
# gRPC, Triton expects it prefixed with "triton-grpc-protocol-".
TRITON_ADMIN_HEADER = "ks-triton-admin"
TRITON_ADMIN_KEY_FILE = "triton-admin.key"
TRITON_RESTRICTED = "model-repository,shared-memory"


def triton_admin_key(settings: CommonSettings) -> str:
    """KS_TRITON_ADMIN_KEY, else the key `make up` generated into the run directory ("" = none)."""
    explicit = settings.triton_admin_key.get_secret_value().strip()
    if explicit:
        return explicit
    try:
        return (settings.run_dir / TRITON_ADMIN_KEY_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def ensure_triton_admin_key(settings: CommonSettings) -> str:
    """The stack's Triton admin key, generated once into <run dir>/triton-admin.key (0600)."""
    key = triton_admin_key(settings)
    if key:
        return key
    # Another `make up` may write it meanwhile: what is in the file then wins.
    create_secret_file(settings.run_dir / TRITON_ADMIN_KEY_FILE, secrets.token_urlsafe(32) + "\n")
    return triton_admin_key(settings)


def triton_admin_headers(settings: CommonSettings, protocol: str = "grpc") -> dict[str, str]:
    """Headers for a call of Triton's restricted APIs (tritonclient ``headers=``)."""
    key = triton_admin_key(settings)
    if not key:
        return {}
    if protocol == "grpc":
        return {f"triton-grpc-protocol-{TRITON_ADMIN_HEADER}": key}
    return {TRITON_ADMIN_HEADER: key}


if __name__ == "__main__":
    # python -m services.common.auth >> .env: a new token set for docker-compose (one line).
    print(f"KS_AUTH_TOKENS='{new_token_set().to_json(None)}'")
