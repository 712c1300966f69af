"""The prompt settings the infer service serves with and the trainer builds training and eval
prompts with: one definition both read, so the two cannot drift apart."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class PromptSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    infer_default_k: int = Field(4, ge=0, le=20, description="Passages retrieved per answer.")
    # ~4 characters per token: the prompt must stay within the engine's token limit.
    infer_max_context_chars: int = Field(
        4000, ge=200, description="Context handed to the model, in characters."
    )
