from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.llm.settings import PromptSettings


class InferSettings(PromptSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    infer_default_max_tokens: int = Field(
        64, ge=1, description="New tokens of an answer whose request sets no max_tokens."
    )
    infer_template: Literal["cited", "step_by_step"] = Field(
        "cited", description="Prompt template of an Ask that names none."
    )
    infer_default_deadline_s: float = Field(
        60.0, gt=0, description="Deadline of a whole Ask whose caller sets none, in seconds."
    )
    # Shadow traffic must never queue up behind or in front of live requests.
    infer_max_shadow_inflight: int = Field(
        4,
        ge=0,
        description=(
            "Mirrored shadow calls in flight at once; beyond it a mirror is skipped (and "
            "counted); 0 = no mirroring."
        ),
    )
    infer_shadow_priority: int = Field(
        2,
        ge=1,
        le=2,
        description="Triton priority of mirrored calls (1 = highest; the model has 2 levels).",
    )
    # Corrections become training data only with their question.
    infer_request_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="How long a request's question is kept for feedback on it, in seconds.",
    )
