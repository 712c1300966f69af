"""Caps on every caller-controlled field that would otherwise be unbounded, and the checks that
enforce them.

Each cap is a setting (``KS_LIMIT_*``) that every service inherits through CommonSettings; each
service checks its own requests in one place with :meth:`LimitSettings.check_text` and
:meth:`LimitSettings.check_list`. A breach raises :class:`LimitExceeded`, whose message names
the field, its size, the limit and the setting; the gRPC interceptor answers it with
INVALID_ARGUMENT, and the raw-documents consumer dead-letters the record with it as the reason.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.errors import InvalidArgument


class LimitExceeded(InvalidArgument):
    """A field over its cap; the message names the field and the limit."""


class LimitSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    limit_query_chars: int = Field(
        4000, ge=1, description="Longest Search query or Ask question, in characters."
    )
    limit_prompt_chars: int = Field(
        16_000, ge=1, description="Longest raw prompt of a Score call, in characters."
    )
    limit_filter_values: int = Field(
        256,
        ge=1,
        description="Most values in one search filter list (domains, sources, doc ids, groups).",
    )
    limit_tags: int = Field(64, ge=0, description="Most tags on one document.")
    limit_tag_chars: int = Field(128, ge=1, description="Longest document tag, in characters.")
    limit_attributes: int = Field(
        64, ge=0, description="Most metadata attributes (key/value pairs) on one document."
    )
    limit_attribute_key_chars: int = Field(
        128, ge=1, description="Longest metadata attribute name, in characters."
    )
    limit_attribute_chars: int = Field(
        2048, ge=1, description="Longest metadata attribute value, in characters."
    )
    limit_label_chars: int = Field(
        256,
        ge=1,
        description=(
            "Longest document source or domain, caller, adapter, parent adapter or request id, "
            "in characters."
        ),
    )
    limit_candidates: int = Field(
        16, ge=2, description="Most candidate answers of one score-mode request."
    )
    limit_candidate_chars: int = Field(
        2000, ge=1, description="Longest candidate answer of a score-mode request, in characters."
    )
    limit_stop_strings: int = Field(8, ge=0, description="Most stop strings of one Ask.")
    limit_stop_chars: int = Field(128, ge=1, description="Longest stop string, in characters.")
    limit_correction_chars: int = Field(
        8000, ge=1, description="Longest feedback correction, in characters."
    )
    limit_comment_chars: int = Field(
        2000, ge=1, description="Longest feedback comment, in characters."
    )
    limit_reason_chars: int = Field(
        1000,
        ge=1,
        description="Longest free-text reason (Train reason and gate.force_reason), in characters.",
    )
    limit_train_questions: int = Field(
        256, ge=0, description="Most questions one Train request (or retrain event) may carry."
    )
    limit_gate_eval_items: int = Field(
        100_000, ge=1, description="Largest gate.min_eval_items override a Train may ask for."
    )

    @staticmethod
    def _setting(limit: str) -> str:
        return f"KS_{limit.upper()}"

    def check_text(self, field: str, value: str, limit: str) -> None:
        """LimitExceeded when ``value`` has more characters than the setting ``limit``."""
        cap = getattr(self, limit)
        if len(value) > cap:
            raise LimitExceeded(
                f"{field} has {len(value)} characters; the limit is {cap} ({self._setting(limit)})"
            )

    def check_at_most(self, field: str, value: float, limit: str) -> None:
        """LimitExceeded when a number is above the setting ``limit``."""
        cap = getattr(self, limit)
        if value > cap:
            raise LimitExceeded(
                f"{field}={value} is above the limit of {cap} ({self._setting(limit)})"
            )

    def check_list(
        self,
        field: str,
        values: Collection[str],
        count_limit: str,
        each_limit: str | None = None,
    ) -> None:
        """LimitExceeded when there are more values than ``count_limit`` or, with
        ``each_limit``, one of them is longer than it."""
        cap = getattr(self, count_limit)
        if len(values) > cap:
            raise LimitExceeded(
                f"{field} has {len(values)} entries; the limit is {cap} "
                f"({self._setting(count_limit)})"
            )
        if each_limit is not None:
            for i, value in enumerate(values):
                self.check_text(f"{field}[{i}]", value, each_limit)

    def check_search_filters(self, filters: Any, prefix: str = "filters") -> None:
        """Caps a SearchFilters message (domains, sources, doc ids, access groups)."""
        lists = {
            "domains": filters.domains,
            "sources": filters.sources,
            "doc_ids": filters.doc_ids,
            "access.groups": filters.access.groups,
        }
        for name, values in lists.items():
            self.check_list(f"{prefix}.{name}", values, "limit_filter_values")
