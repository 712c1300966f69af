"""Drift statistics: the vectorised permutation test against a plain loop, calibration and
power on synthetic data, KL over topics and terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.monitor.drift import Reference, mmd2_permutation_test, terms, window_stats


def naive_mmd2(x: np.ndarray, y: np.ndarray, sigma2: float) -> float:
    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma2))

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.sum() / (n * m)
    )


def reference(rng, n=300, d=16) -> Reference:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return Reference.build(x, [f"question {i}" for i in range(n)], topics=4)


def test_vectorised_permutations_equal_a_loop():
    rng = np.random.default_rng(0)
    ref = reference(rng, 60, 5)
    y = rng.normal(0.3, 1, size=(20, 5)).astype(np.float32)
    observed, p_value = mmd2_permutation_test(
        ref, y, permutations=50, generator=torch.Generator().manual_seed(1)
    )
    assert observed == pytest.approx(naive_mmd2(ref.embeddings, y, ref.sigma2), rel=1e-4)
    # Same permutations by hand.
    pooled = np.concatenate([ref.embeddings, y])
    order = torch.argsort(torch.rand(50, 80, generator=torch.Generator().manual_seed(1)), dim=1)
    loop = []
    for perm in order.numpy():
        window = set(perm[:20].tolist())
        ys = pooled[sorted(window)]
        xs = pooled[[i for i in range(80) if i not in window]]
        loop.append(naive_mmd2(xs, ys, ref.sigma2))
    assert p_value == pytest.approx(np.mean(np.array(loop) >= observed - 1e-9), abs=1e-9)


def test_false_alarms_are_near_alpha_and_a_mean_shift_is_found():
    rng = np.random.default_rng(1)
    ref = reference(rng)
    gen = torch.Generator().manual_seed(0)
    same = [
        mmd2_permutation_test(ref, rng.normal(size=(50, 16)).astype(np.float32), 100, gen)[1]
        for _ in range(60)
    ]
    assert np.mean(np.array(same) < 0.05) <= 0.12
    shift = np.zeros(16, dtype=np.float32)
    shift[:8] = 0.5
    moved = [
        mmd2_permutation_test(
            ref, (rng.normal(size=(50, 16)) + shift).astype(np.float32), 100, gen
        )[1]
        for _ in range(10)
    ]
    assert np.mean(np.array(moved) < 0.05) >= 0.9


def test_kl_grows_when_topics_and_terms_change():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(4, 16)) * 4
    labels = rng.integers(0, 4, 400)
    x = (centers[labels] + rng.normal(size=(400, 16))).astype(np.float32)
    texts = [f"does drug {label} help adults" for label in labels]
    ref = Reference.build(x, texts, topics=4)
    same_idx = rng.integers(0, 400, 64)
    same = window_stats(ref, x[same_idx], [texts[i] for i in same_idx])
    only_one = (centers[0] + rng.normal(size=(64, 16))).astype(np.float32)
    changed = window_stats(ref, only_one, ["is surgery safe in children"] * 64)
    assert changed.kl_topics > 5 * max(same.kl_topics, 0.01)
    assert changed.kl_terms > 5 * max(same.kl_terms, 0.01)
    assert changed.p_value < 0.01 and changed.drifted_topics
    assert terms("Is the drug SAFE for children?") == ["drug", "safe", "children"]


def test_replay_detects_a_switch_between_mesh_groups(pubmedqa, tmp_path, capsys):
    """Adult-only questions, then paediatric ones: drift within 2 windows of the switch, and
    no drift before it."""
    import json
    import random

    from services.cli.main import main
    from services.trainer.evaluation import mesh_groups

    adult_ids, child_ids = mesh_groups(pubmedqa)
    adult = [pubmedqa[k]["QUESTION"] for k in adult_ids]
    child = [pubmedqa[k]["QUESTION"] for k in child_ids]
    random.Random(0).shuffle(adult)
    reference, stream = adult[:100], adult[100:164] + child[:64]

    def write(path, texts):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        return str(path)

    code = main(
        [
            "drift",
            "replay",
            "--reference",
            write(tmp_path / "ref.jsonl", reference),
            "--stream",
            write(tmp_path / "stream.jsonl", stream),
            "--window",
            "32",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    windows, summary = lines[:-1], lines[-1]
    assert summary["windows"] == len(windows) == (len(stream) - 32) // 32 + 1
    assert [w["end"] for w in windows] == [32 * (i + 1) for i in range(len(windows))]
    assert not any(w["drift"] for w in windows if w["end"] <= 64)
    assert summary["first_drift_end"] is not None and summary["first_drift_end"] <= 64 + 2 * 32
    assert set(windows[0]) == {
        "window",
        "start",
        "end",
        "mmd2",
        "p_value",
        "kl_topics",
        "kl_terms",
        "drift",
    }


def test_replay_rejects_bad_input(tmp_path, capsys):
    from services.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n', encoding="utf-8")
    assert main(["drift", "replay", "--reference", str(bad), "--stream", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
