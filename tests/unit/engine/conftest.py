"""Fixtures of the engine's tests: three random adapters of the tiny model, in a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.adapters import create_random_adapter, store_adapter


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory) -> tuple[Path, list[str]]:
    """(store directory, the three adapters' ids)."""
    root = tmp_path_factory.mktemp("adapters")
    ids = []
    for seed in (1, 2, 3):
        path = create_random_adapter(tiny_model, root / f"src-{seed}", seed=seed, scale=0.5)
        ids.append(store_adapter(path, root / "store")[0])
    return root / "store", ids
