from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class OpenAISettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    openai_model_name: str = Field(
        "knowstream",
        min_length=1,
        description=(
            "The model name that is served as the rollout decides (live, the canary's share of "
            "callers, shadow mirroring), like an Ask that names no adapter."
        ),
    )
    openai_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "Deadline of the gRPC call behind one HTTP request; the infer service also applies "
            "its own (KS_INFER_DEFAULT_DEADLINE_S)."
        ),
    )
