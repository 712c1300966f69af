from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class IngestSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    ingest_max_document_bytes: int = Field(1024 * 1024, ge=1)
    ingest_max_batch: int = Field(1000, ge=1, description="Documents per IngestDocuments call.")
    ingest_chunk_tokens: int = Field(200, ge=8, le=512)
    ingest_chunk_overlap: int = Field(32, ge=0)
    ingest_metrics_port: int = 0
    ingest_raw_group: str = "ks-ingest-raw"
    # How long an accepted but not yet indexed version counts as "unchanged" for dedup.
    ingest_inflight_s: float = Field(60.0, ge=0)
