"""Settings are documented from their definitions: every field has a description, and README.md's
settings reference is what deploy/settings_doc.py renders from them now."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from deploy import settings_doc
from services.common.limits import LimitSettings
from services.common.settings import CommonSettings


def test_every_setting_has_a_description() -> None:
    missing = [
        f"{cls.__module__}.{cls.__name__}.{name}"
        for cls in settings_doc.settings_classes()
        for name, field in settings_doc.own_fields(cls)
        if not (field.description or "").strip()
    ]
    assert not missing, f"settings without Field(description=...): {missing}"


def test_every_field_is_documented_once_at_its_class() -> None:
    classes = settings_doc.settings_classes()
    assert classes[:2] == [CommonSettings, LimitSettings]
    documented = [name for cls in classes for name, _ in settings_doc.own_fields(cls)]
    assert len(documented) == len(set(documented))
    for cls in classes:
        assert set(cls.model_fields) <= set(documented), cls.__name__


def test_readme_matches_the_definitions() -> None:
    readme = settings_doc.README.read_text(encoding="utf-8")
    assert settings_doc.rewrite(readme) == readme, (
        "README.md's settings reference differs from the settings classes: run `make docs`"
    )


class _Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KS_X_")

    password: SecretStr = Field(SecretStr("hunter2"), description="never shown")
    empty_secret: SecretStr = Field(SecretStr(""), description="a | pipe and <run dir>")
    aliased: int = Field(3, alias="OTHER_NAME", ge=1, lt=10, description="`a <b>` code")
    payload_bytes: int = Field(2 * 1024 * 1024, description="sized")


def test_rendering() -> None:
    fields = _Example.model_fields
    assert settings_doc.render_default("password", fields["password"]) == "*secret*"
    assert settings_doc.render_default("empty_secret", fields["empty_secret"]) == "unset"
    assert settings_doc.env_name(_Example, "password", fields["password"]) == "KS_X_PASSWORD"
    assert settings_doc.env_name(_Example, "aliased", fields["aliased"]) == "OTHER_NAME"
    assert settings_doc.render_allowed(fields["aliased"]) == "1 ≤ x < 10"
    assert settings_doc.render_default("payload_bytes", fields["payload_bytes"]) == (
        "`2097152` (2 MiB)"
    )
    assert settings_doc._cell("a | pipe and <run dir>") == "a \\| pipe and &lt;run dir>"
    assert settings_doc._cell("0 < x") == "0 < x"
    assert settings_doc._cell("`a <b>` code") == "`a <b>` code"
