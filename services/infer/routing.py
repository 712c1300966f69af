"""Which adapter serves a request, and how alike two answers are."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from services.common.adapters import BASE, Rollout


@dataclass(frozen=True)
class Route:
    adapter: str
    # "live", "canary" or "explicit".
    route: str
    # Adapter to mirror the request to (shadow mode), or None.
    mirror: str | None = None


def bucket(key: str) -> float:
    """A stable number in [0, 1) for a key: the same caller always lands in the same bucket."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def route(rollout: Rollout, caller: str, rng: random.Random | None = None) -> Route:
    """Routes a request that did not name an adapter.

    Canary: a caller is in the canary when its bucket (salted with the candidate id, so each new
    candidate gets a fresh sample of callers) is below the share; without a caller id every
    request is drawn independently. Shadow: a share of live requests is mirrored.
    """
    rng = rng or random.Random()
    live = rollout.live or BASE
    candidate = rollout.candidate
    if candidate and rollout.mode == "canary":
        draw = bucket(f"{candidate}:{caller}") if caller else rng.random()
        if draw < rollout.canary_share:
            return Route(candidate, "canary")
    if candidate and rollout.mode == "shadow" and candidate != live:
        mirror = rng.random() < rollout.shadow_share
        return Route(live, "live", candidate if mirror else None)
    return Route(live, "live")
