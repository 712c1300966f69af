from services.retrieve.fusion import rrf, weighted_rrf


def test_rrf_rewards_agreement():
    fused = rrf([["a", "b", "c"], ["b", "a", "d"]])
    assert [d for d, _ in fused][:2] in (["a", "b"], ["b", "a"])
    assert {d for d, _ in fused} == {"a", "b", "c", "d"}


def test_ties_break_deterministically_towards_the_first_list():
    fused = rrf([["a", "b"], ["b", "a"]])
    assert [d for d, _ in fused] == ["a", "b"]


def test_weights_let_the_stronger_retriever_lead():
    strong, weak = ["good", "x", "y"], ["bad", "z", "good"]
    fused = weighted_rrf([strong, weak], [3.0, 1.0])
    assert fused[0][0] == "good"


def test_plain_rrf_can_lose_to_the_better_single_retriever():
    """The case the weighting exists for: the better retriever ranks the relevant item first,
    the weak one prefers others; plain RRF lets the weak one's favourites win."""
    better = ["relevant", "a", "b"]
    weak = ["a", "b", "c"]
    plain = [d for d, _ in rrf([better, weak])]
    weighted = [d for d, _ in weighted_rrf([better, weak], [1.0, 0.01])]
    assert plain.index("relevant") > 0
    assert weighted[0] == "relevant"
