from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.keys import EVAL_CALLER
from services.common.settings import CommonSettings


class MonitorSettings(CommonSettings):
    """Drift monitor settings. Defaults: a window is drifted when the MMD permutation test
    gives p < 0.01 (100 permutations); KL over topics/terms is reported as evidence, with the
    seed documents' thresholds (KL > 0.15, MMD² > 0.3) available as extra triggers. An event
    needs 2 consecutive drifted windows; after one, 8 windows of cooldown."""

    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    monitor_window: int = Field(32, ge=4, description="Questions per drift window.")
    monitor_step: int = Field(
        0,
        ge=0,
        description="Questions between window starts; 0 = a full window (no overlap).",
    )
    monitor_permutations: int = Field(
        100, ge=10, description="Permutations of the MMD permutation test per window."
    )
    monitor_p_value: float = Field(
        0.01, gt=0, lt=1, description="A window is drifted when the test's p-value is below it."
    )
    monitor_kl_threshold: float = Field(
        0.0,
        ge=0,
        description=(
            "Extra trigger: a window is drifted when KL over topics exceeds it; 0 = off (the "
            "seed documents' threshold: 0.15)."
        ),
    )
    monitor_mmd_threshold: float = Field(
        0.0,
        ge=0,
        description=(
            "Extra trigger: a window is drifted when MMD² exceeds it; 0 = off (the seed "
            "documents' threshold: 0.3)."
        ),
    )
    monitor_topics: int = Field(
        8,
        ge=2,
        description="k-means topics of a reference (fewer for a small one: one per 8 questions).",
    )
    monitor_vocabulary: int = Field(
        500, ge=10, description="Most frequent terms of a reference that KL over terms counts."
    )
    monitor_seed: int = Field(0, description="Seed of the topic clustering and the permutations.")

    # Decision policy (services/monitor/policy.py).
    monitor_consecutive: int = Field(2, ge=1, description="Drifted windows in a row per event.")
    monitor_cooldown_windows: int = Field(
        8, ge=0, description="Windows after an event that neither count nor trigger."
    )
    # With all-MiniLM-L6-v2 on PubMedQA, a question's own abstract scores 0.73 (median; 5th
    # percentile 0.53) and the best other abstract 0.46: 0.5 separates them.
    monitor_gap_score: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A question is retrieved poorly when its best dense (cosine) score is lower.",
    )
    monitor_gap_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "Share of poorly retrieved questions in the triggering windows that makes a "
            "knowledge gap."
        ),
    )
    monitor_low_confidence: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Answers below this confidence count as low-confidence (reported per window).",
    )

    monitor_auto_reference: int = Field(
        200,
        ge=0,
        description=(
            "Without a reference, the first this-many questions become it; 0 = wait for "
            "SetReference."
        ),
    )
    monitor_reference_max: int = Field(
        1000, ge=8, description="Largest reference (a larger source is sampled evenly)."
    )
    monitor_log_max: int = Field(
        20_000,
        ge=100,
        description="Questions kept in Redis for time-range and recent references.",
    )
    monitor_history: int = Field(
        1000, ge=10, description="Windows and drift events kept for GetStatus."
    )
    # Delivery is at least once.
    monitor_dedup_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="How long an event id is remembered for de-duplication, in seconds.",
    )
    monitor_ignore_callers: list[str] = Field(
        default_factory=lambda: [EVAL_CALLER],
        description=(
            "Callers whose questions are not user traffic (evaluation runs), left out of the "
            "windows (a JSON list)."
        ),
    )
    monitor_group: str = Field("ks-monitor", description="Consumer group of the monitor.")
    monitor_stream_batch: int = Field(
        64, ge=1, description="Most records the monitor's consumer handles per poll."
    )
    monitor_stream_wait_s: float = Field(
        0.2, ge=0, description="Longest wait of a poll for records, in seconds."
    )
