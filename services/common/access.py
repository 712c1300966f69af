"""Document access groups: which chunks a caller may read.

A document may carry access groups (``DocumentMetadata.access_groups``); a document with none is
public. A token carries the groups it may read (``groups`` in the token file; ``*`` = every
group, the default of admin tokens, the services' own included). A caller may read a chunk
when the chunk is public or shares a group with the caller. The retrieve service applies this
inside its engines, like the domain/source/doc-id filters; the infer service passes its
caller's groups on in ``SearchFilters.access`` when it searches on the caller's behalf.

Group names are case-insensitive (stored lowercased): a letter or digit, then up to 63 letters,
digits, ``.``, ``_`` or ``-``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from services.common.errors import InvalidArgument

ALL = "*"  # in a token's groups: reads every group
MAX_GROUPS = 32  # per document, and per token
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

# What a caller may read: None = everything (auth off, or a token with "*"), else the groups
# besides public documents.
Scope = frozenset[str] | None


class InvalidGroups(InvalidArgument):
    """Names what is wrong with a list of access groups."""


def parse_groups(values: Iterable[str] | str, *, allow_all: bool = False) -> frozenset[str]:
    """Validated, lowercased access groups from a list or a comma-separated string."""
    if isinstance(values, str):
        values = values.split(",")
    groups = set()
    for value in values:
        if not isinstance(value, str):
            raise InvalidGroups(f"access group {value!r} is not a string")
        name = value.strip().lower()
        if not name:
            continue
        if name == ALL:
            if not allow_all:
                raise InvalidGroups(f"{ALL!r} (every group) is for tokens, not documents")
        elif not _NAME.match(name):
            raise InvalidGroups(
                f"access group {value[:70]!r}: a letter or digit, then up to 63 of "
                "letters, digits, '.', '_' and '-'"
            )
        groups.add(name)
    if len(groups) > MAX_GROUPS:
        raise InvalidGroups(f"{len(groups)} access groups; at most {MAX_GROUPS}")
    return frozenset(groups)


def token_scope(groups: frozenset[str]) -> Scope:
    return None if ALL in groups else groups


def narrow(own: Scope, requested: Iterable[str] | None) -> Scope:
    """What a search may see: the caller's own scope, narrowed by the groups a request names
    (None = the request names none). A request can narrow, never widen."""
    if requested is None:
        return own
    asked = frozenset(g.strip().lower() for g in requested) - {ALL}
    return asked if own is None else own & asked


def readable(groups: Iterable[str], scope: Scope) -> bool:
    """Whether a chunk with these groups may be read within ``scope``."""
    if scope is None:
        return True
    chunk = set(groups)
    return not chunk or bool(chunk & scope)
