from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class EmbedSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    embed_group: str = Field("ks-embed", description="Consumer group shared by all embed workers.")
    embed_stream_batch: int = Field(
        32, ge=1, description="Micro-batching of the chunk stream: most chunks per micro-batch."
    )
    embed_stream_wait_s: float = Field(
        0.05,
        ge=0,
        description="Micro-batching: longest wait for a micro-batch to fill, in seconds.",
    )
    embed_forward_batch: int = Field(
        16, ge=1, description="Rows per forward pass (length-sorted within a micro-batch)."
    )
    embed_max_tokens: int = Field(
        256,
        ge=8,
        description="Longer texts are truncated to this many model tokens (at most the model's).",
    )
    embed_bf16: bool | None = Field(
        None,
        description=(
            "torch runtime: bf16 autocast; unset = on when the CPU has native bf16 "
            "(avx512_bf16/amx), else off."
        ),
    )
    embed_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default.")
    embed_max_texts: int = Field(256, ge=1, description="Texts per Embed call.")
