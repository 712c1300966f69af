from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class EmbedSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    embed_group: str = Field("ks-embed", description="Consumer group shared by all embed workers.")
    # Micro-batching of the chunk stream: up to this many chunks, waiting at most this long.
    embed_stream_batch: int = Field(32, ge=1)
    embed_stream_wait_s: float = Field(0.05, ge=0)
    # Rows per forward pass (length-sorted within a micro-batch).
    embed_forward_batch: int = Field(16, ge=1)
    embed_max_tokens: int = Field(256, ge=8)
    # bf16 autocast: None = on when the CPU has native bf16 (avx512_bf16/amx), else off.
    embed_bf16: bool | None = None
    embed_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default.")
    embed_max_texts: int = Field(256, ge=1, description="Texts per Embed call.")
    embed_metrics_port: int = 0
