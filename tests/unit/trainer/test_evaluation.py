"""PubMedQA evaluation: item loading, metrics, and the evaluation loop with fake services."""

from __future__ import annotations

import pytest

from services.trainer.evaluation import Answer, Item, evaluate, load_items, metrics


def test_items_are_loaded_and_bad_ones_named(pubmedqa):
    items = load_items(pubmedqa)
    assert len(items) == 500 and {i.label for i in items} == {"yes", "no", "maybe"}
    first = next(iter(pubmedqa))
    assert items[0].id == first and items[0].contexts
    with pytest.raises(ValueError, match="item 7: final_decision 'perhaps'"):
        load_items({"7": {"QUESTION": "q?", "final_decision": "perhaps"}})
    with pytest.raises(ValueError, match="item 8: no QUESTION"):
        load_items({"8": {"final_decision": "yes"}})
    with pytest.raises(ValueError, match="PubMedQA"):
        load_items({})


def test_metrics():
    golds = ["yes", "yes", "no", "maybe"]
    m = metrics(golds, ["yes", "no", "no", "yes"])
    assert m["accuracy"] == 0.5 and m["n"] == 4
    assert m["per_label"] == {"yes": 0.5, "no": 1.0, "maybe": 0.0}
    # F1: yes 0.5, no 2/3, maybe 0 -> mean 0.3889
    assert m["macro_f1"] == pytest.approx(0.3889, abs=1e-4)
    everything_yes = metrics(golds, ["yes"] * 4)
    assert everything_yes["accuracy"] == 0.5 and everything_yes["macro_f1"] == pytest.approx(
        (2 * 0.5 * 1 / 1.5) / 3, abs=1e-4
    )


def test_evaluate_asks_every_item_and_measures_retrieval():
    items = [Item(str(i), f"q{i}", ["yes", "no"][i % 2]) for i in range(10)]
    asked = []

    def ask(item: Item) -> Answer:
        asked.append(item.id)
        return Answer("yes", 0.9, [])

    def search(item: Item) -> list[str]:
        return [item.id] if int(item.id) < 7 else ["other"]

    result = evaluate(items, ask, search, concurrency=3)
    assert sorted(asked) == sorted(i.id for i in items)
    assert result["accuracy"] == 0.5 and result["retrieval_recall@5"] == 0.7
    assert result["predicted"] == {"yes": 10, "no": 0, "maybe": 0}
    assert evaluate(items, ask)["retrieval_recall@5"] is None
