from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class MonitorSettings(CommonSettings):
    """Drift detection settings. Defaults: a window is drifted when the MMD permutation test
    gives p < 0.01 (100 permutations); KL over topics/terms is reported as evidence, with the
    seed documents' thresholds (KL > 0.15, MMD² > 0.3) available as extra triggers."""

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
