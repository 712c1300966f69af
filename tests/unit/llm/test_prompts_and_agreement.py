"""Prompt building, routing and agreement: the infer service's plain logic."""

from __future__ import annotations

import random

import pytest

from services.common.adapters import Rollout, content_id, store_adapter
from services.infer.routing import route
from services.llm.agreement import agreement
from services.llm.prompts import Passage, build_prompt, referenced_numbers


def passages(n: int, size: int = 100) -> list[Passage]:
    return [Passage(f"d{i}", f"d{i}#h#0", f"Title {i}", "x" * size) for i in range(n)]


def test_prompt_numbers_passages_within_the_budget():
    prompt = build_prompt("Why?", passages(5, 300), max_context_chars=700)
    assert [p.doc_id for p in prompt.passages] == ["d0", "d1", "d2"]
    assert (
        "[1] Title 0" in prompt.user and "[3] Title 2" in prompt.user and "[4]" not in prompt.user
    )
    assert prompt.user.rstrip().endswith("cite the passages you used.")
    scored = build_prompt("Why?", passages(1), candidates=["yes", "no"])
    assert "Answer with one of: yes, no." in scored.user
    bare = build_prompt("Why?", [])
    assert bare.passages == [] and "Context" not in bare.user
    with pytest.raises(ValueError):
        build_prompt("Why?", [], template="nope")
    assert referenced_numbers("As [1] and [3] show, not [x].") == {1, 3}


def test_canary_is_sticky_per_caller_and_near_its_share():
    rollout = Rollout(live="aaaa", candidate="bbbb", mode="canary", canary_share=0.3)
    served = {c: route(rollout, f"caller-{c}").adapter for c in range(2000)}
    assert all(route(rollout, f"caller-{c}").adapter == served[c] for c in range(0, 2000, 7))
    share = sum(a == "bbbb" for a in served.values()) / len(served)
    assert 0.25 < share < 0.35
    assert {route(rollout, "caller-1").route, route(rollout, "caller-2").route} <= {
        "live",
        "canary",
    }


def test_shadow_mirrors_a_share_and_always_serves_live():
    rollout = Rollout(live="aaaa", candidate="bbbb", mode="shadow", shadow_share=0.5)
    rng = random.Random(7)
    routes = [route(rollout, "", rng) for _ in range(1000)]
    assert all(r.adapter == "aaaa" for r in routes)
    assert 400 < sum(r.mirror == "bbbb" for r in routes) < 600
    off = Rollout(live="aaaa", candidate="bbbb", mode="off")
    assert route(off, "x").mirror is None and route(off, "x").adapter == "aaaa"


def test_agreement():
    assert agreement("Yes.", "yes", scored=True) == 1.0
    assert agreement("yes", "no", scored=True) == 0.0
    assert agreement("the drug lowers blood pressure", "the drug lowers blood pressure") == 1.0
    assert 0 < agreement("the drug lowers pressure", "a drug raises pressure") < 1
    assert agreement("alpha", "beta") == 0.0


def test_alias_resolution():
    r = Rollout(live="aaaa", candidate="bbbb", mode="shadow")
    assert r.resolve_alias("live") == "aaaa" and r.resolve_alias("shadow") == "bbbb"
    assert r.resolve_alias("canary") is None and r.resolve_alias("base") == "base"


def test_store_is_content_addressed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}', encoding="utf-8")
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    first, path = store_adapter(src, tmp_path / "store")
    again, _ = store_adapter(src, tmp_path / "store")
    assert first == again == content_id(path) and len(first) == 16
    (src / "adapter_model.safetensors").write_bytes(b"other weights")
    assert store_adapter(src, tmp_path / "store")[0] != first
    with pytest.raises(ValueError, match="missing"):
        store_adapter(tmp_path, tmp_path / "store")
