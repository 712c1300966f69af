from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class EngineSettings(CommonSettings):
    """Settings of the LLM engine inside Triton (read from the environment Triton inherits)."""

    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    llm_threads: int = Field(2, ge=1)
    # Adapters kept in memory at once; the least recently used one is unloaded first.
    llm_max_adapters: int = Field(8, ge=1)
    llm_max_prompt_tokens: int = Field(2048, ge=16)


class InferSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    infer_metrics_port: int = 0
    infer_default_k: int = Field(4, ge=0, le=20)
    infer_default_max_tokens: int = Field(64, ge=1)
    # Context handed to the model, in characters (~4 per token): the prompt must stay within
    # the engine's token limit on a small model.
    infer_max_context_chars: int = Field(4000, ge=200)
    infer_template: Literal["cited", "step_by_step"] = "cited"
    # Deadline of a whole Ask when the caller sets none.
    infer_default_deadline_s: float = Field(60.0, gt=0)
    # Mirrored shadow calls in flight at once; beyond this a mirror is skipped (counted), so
    # shadow traffic can never queue up behind or in front of live requests.
    infer_max_shadow_inflight: int = Field(4, ge=0)
    # Triton priority of mirrored calls (1 = highest; the model config has 2 levels).
    infer_shadow_priority: int = Field(2, ge=1, le=2)
    # How long a request's question is kept for feedback on it (corrections become training
    # data only with their question).
    infer_request_ttl_s: int = Field(7 * 24 * 3600, ge=60)
