"""README.md's settings reference, rendered from the settings classes themselves.

Every field's ``Field(description=...)`` is its documentation: ``make docs`` (``python -m
deploy.settings_doc``) rewrites the part of README.md between :data:`BEGIN` and :data:`END`,
and tests/unit/deploy/test_settings_doc.py fails when a field has no description or when the README
no longer matches. It lives in deploy/ because it imports every service's settings module, which
no service may do.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import AliasChoices, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from services.common.settings import REPO_ROOT

README = REPO_ROOT / "README.md"
BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"
# Common first, then the limits every service inherits, then each service's own.
COMMON_MODULES = ("services.common.settings", "services.common.limits")


def settings_modules() -> list[str]:
    services = sorted(
        p.parent.name
        for p in (REPO_ROOT / "services").glob("*/settings.py")
        if p.parent.name != "common"
    )
    return [*COMMON_MODULES, *(f"services.{name}.settings" for name in services)]


def settings_classes() -> list[type[BaseSettings]]:
    """Every settings class, in the order of :func:`settings_modules` and, within a module, of
    definition. Found rather than listed, so that a new service's settings are documented (and
    checked) without anyone remembering to add them."""
    classes: list[type[BaseSettings]] = []
    for name in settings_modules():
        module = importlib.import_module(name)
        classes += [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, BaseSettings)
            and value.__module__ == name
        ]
    return classes


def own_fields(cls: type[BaseSettings]) -> Iterator[tuple[str, FieldInfo]]:
    """The fields ``cls`` itself defines (inherited ones are documented at their own class)."""
    annotations = vars(cls).get("__annotations__", {})
    for name, field in cls.model_fields.items():
        if name in annotations:
            yield name, field


def env_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The environment variable pydantic-settings reads: an alias as it is, else the class's
    env_prefix and the field name (matched case-insensitively; shown upper-case)."""
    alias: Any = field.validation_alias or field.alias
    if isinstance(alias, AliasChoices):
        alias = next((c for c in alias.choices if isinstance(c, str)), None)
    if isinstance(alias, str):
        return alias.upper()
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    text = str(value)
    # Paths under the checkout depend on where it is; shown relative to the repository root.
    if isinstance(value, str | Path) and Path(text).is_relative_to(REPO_ROOT.parent):
        text = os.path.relpath(text, REPO_ROOT)
    return text


def _in_units(value: int, units: tuple[tuple[str, int], ...]) -> str:
    """`` (16 MiB)`` for 16777216 in byte units: the largest unit that divides it, if any."""
    for unit, size in units:
        if value >= size and value % size == 0:
            return f" ({value // size} {unit})"
    return ""


_BYTES = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_SECONDS = (("days", 86400), ("h", 3600))


def render_default(name: str, field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, SecretStr | SecretBytes):
        # Never the value, even a default: only whether there is one.
        return "*secret*" if value.get_secret_value() else "unset"
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    text = f"`{_value_text(value)}`"
    if isinstance(value, int) and not isinstance(value, bool):
        if name.endswith("_bytes"):
            text += _in_units(value, _BYTES)
        elif name.endswith("_s"):
            text += _in_units(value, _SECONDS)
    return text


def render_allowed(field: FieldInfo) -> str:
    """The values validation accepts: a Literal's choices, or the numeric bounds."""
    if get_origin(field.annotation) is Literal:
        return ", ".join(f"`{_value_text(choice)}`" for choice in get_args(field.annotation))
    low = high = ""
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            low = f"{rule.ge} ≤ "
        elif isinstance(rule, annotated_types.Gt):
            low = f"{rule.gt} < "
        elif isinstance(rule, annotated_types.Le):
            high = f" ≤ {rule.le}"
        elif isinstance(rule, annotated_types.Lt):
            high = f" < {rule.lt}"
        elif isinstance(rule, annotated_types.MinLen):
            return "non-empty" if rule.min_length == 1 else f"≥ {rule.min_length} characters"
    return f"{low}x{high}" if low or high else ""


# Where Markdown would start an HTML tag (``<run dir>`` would show as nothing).
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def _cell(text: str) -> str:
    """``text`` safe in a table cell: pipes escaped, and tag starts outside code spans."""
    spans = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(s if i % 2 else _TAG_START.sub("&lt;", s) for i, s in enumerate(spans))


def render() -> str:
    """The generated block, markers included."""
    lines = [
        BEGIN,
        "<!-- Generated by `make docs` from the settings classes' Field descriptions "
        "(deploy/settings_doc.py): edit those, not this. -->",
    ]
    for cls in settings_classes():
        rows = [
            "| "
            + " | ".join(
                _cell(cell)
                for cell in (
                    f"`{env_name(cls, name, field)}`",
                    render_default(name, field),
                    render_allowed(field),
                    field.description or "",
                )
            )
            + " |"
            for name, field in own_fields(cls)
        ]
        if not rows:
            continue
        path = cls.__module__.replace(".", "/") + ".py"
        lines += [
            "",
            f"### `{cls.__name__}` ({path})",
            "",
            "| variable | default | allowed | meaning |",
            "|---|---|---|---|",
            *rows,
        ]
    return "\n".join([*lines, "", END])


def rewrite(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`render`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the markers {BEGIN} and {END}, in that order")
    return readme[:start] + render() + readme[end + len(END) :]


def main() -> None:
    text = README.read_text(encoding="utf-8")
    new = rewrite(text)
    if new != text:
        README.write_text(new, encoding="utf-8")
        print(f"rewrote the settings reference in {README.name}")
    else:
        print(f"the settings reference in {README.name} is up to date")


if __name__ == "__main__":
    main()
