from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class IngestSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    ingest_max_document_bytes: int = Field(
        1024 * 1024, ge=1, description="Largest document text (UTF-8 bytes); larger is rejected."
    )
    ingest_max_batch: int = Field(1000, ge=1, description="Documents per IngestDocuments call.")
    ingest_chunk_tokens: int = Field(
        200, ge=8, le=512, description="Chunk length, in embedding-model tokens."
    )
    ingest_chunk_overlap: int = Field(
        32, ge=0, description="Tokens consecutive chunks of a document share."
    )
    ingest_raw_group: str = Field(
        "ks-ingest-raw", description="Consumer group of ingest's raw-documents consumer."
    )
    # -- the outbox's reconciler (services/ingest/reconciler.py) ------------------------------
    ingest_check_after_s: float = Field(
        60.0,
        gt=0,
        description=(
            "An accepted version or deletion that retrieve has not applied this long after it "
            "was published is checked: published again if its records are gone from the "
            "broker's log, checked again this much later if they are still waiting there."
        ),
    )
    ingest_republish_anyway_s: float = Field(
        900.0,
        gt=0,
        description=(
            "Published again even though its records are still in the log, once it has waited "
            "this long (a consumer may have skipped it)."
        ),
    )
    ingest_reconcile_interval_s: float = Field(
        5.0, gt=0, description="How often the reconciler looks at the outbox."
    )
    ingest_reconcile_batch: int = Field(
        500, ge=1, description="Outbox entries the reconciler looks at per round."
    )
