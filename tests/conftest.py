from __future__ import annotations

import json
from pathlib import Path

import pytest

PUBMEDQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pubmedqa" / "labeled.json"


@pytest.fixture(scope="session")
def pubmedqa() -> dict:
    if not PUBMEDQA.exists():
        pytest.fail(f"{PUBMEDQA} is missing: the tests need the shared PubMedQA data")
    return json.loads(PUBMEDQA.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tokenizer():
    from services.common.models import load_tokenizer

    return load_tokenizer("all-MiniLM-L6-v2")
