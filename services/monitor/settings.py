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

    monitor_window: int = Field(32, ge=4)
    # 0 = a full window (non-overlapping windows).
    monitor_step: int = Field(0, ge=0)
    monitor_permutations: int = Field(100, ge=10)
    monitor_p_value: float = Field(0.01, gt=0, lt=1)
    # Extra triggers, off unless set (> 0): KL over topics, and MMD² itself.
    monitor_kl_threshold: float = Field(0.0, ge=0)
    monitor_mmd_threshold: float = Field(0.0, ge=0)
    monitor_topics: int = Field(8, ge=2)
    monitor_vocabulary: int = Field(500, ge=10)
    monitor_seed: int = 0

    # Decision policy (services/monitor/policy.py).
    monitor_consecutive: int = Field(2, ge=1, description="Drifted windows in a row per event.")
    monitor_cooldown_windows: int = Field(8, ge=0)
    # A question retrieved poorly when its best dense (cosine) score is below this. With
    # all-MiniLM-L6-v2 on PubMedQA, a question's own abstract scores 0.73 (median; 5th
    # percentile 0.53) and the best other abstract 0.46: 0.5 separates them.
    monitor_gap_score: float = Field(0.5, ge=0, le=1)
    # Share of poorly retrieved questions in the triggering windows that makes a knowledge gap.
    monitor_gap_share: float = Field(0.5, gt=0, le=1)
    # An answer counts as low-confidence below this (answer-side signal, reported per window).
    monitor_low_confidence: float = Field(0.5, ge=0, le=1)

    # Without a reference, the first this-many questions become it (0 = wait for SetReference).
    monitor_auto_reference: int = Field(200, ge=0)
    # Upper bound of a reference's size (a larger source is sampled evenly).
    monitor_reference_max: int = Field(1000, ge=8)
    # Questions kept in Redis for time-range/recent references, and windows kept for status.
    monitor_log_max: int = Field(20_000, ge=100)
    monitor_history: int = Field(1000, ge=10)
    # How long an event id is remembered for de-duplication (at-least-once delivery).
    monitor_dedup_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # Callers whose questions are not user traffic (evaluation runs): left out of the windows.
    monitor_ignore_callers: list[str] = Field(default_factory=lambda: [EVAL_CALLER])
    monitor_group: str = "ks-monitor"
    monitor_stream_batch: int = Field(64, ge=1)
    monitor_stream_wait_s: float = Field(0.2, ge=0)
    monitor_metrics_port: int = 0
