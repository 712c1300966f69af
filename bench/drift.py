"""Our MMD permutation test against alibi-detect's MMDDrift(backend='pytorch').

Same reference (1,000 x 384), same windows (200 x 384), 100 permutations, one thread each:
200 windows without drift, and windows whose mean is shifted by 0.1 and 0.2 in 20 of the 384
dimensions. alibi-detect runs in bench/.venv-anchors (`make bench-anchors`).

Then the monitor's own windows and policy on a switch between PubMedQA MeSH groups (adult-only
to paediatric questions) at the default window of 32, over random splits (``mesh_switch``).

    .venv/bin/python -m bench.drift --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowstream.events.v1 import events_pb2
from services.common.embedding import Embedder
from services.common.settings import REPO_ROOT
from services.monitor.drift import Reference, mmd2_permutation_test
from services.monitor.policy import DriftPolicy, WindowResult
from services.monitor.settings import MonitorSettings
from services.monitor.windowing import build_reference, compute_window, policy_config
from services.trainer.evaluation import mesh_groups

ANCHORS = REPO_ROOT / "bench" / ".venv-anchors" / "bin" / "python"


def make_data(seed: int, no_drift: int, shifted: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    dim = 384
    reference = rng.normal(size=(1000, dim)).astype(np.float32)
    windows, kinds = [], []
    for _ in range(no_drift):
        windows.append(rng.normal(size=(200, dim)))
        kinds.append("none")
    for shift in (0.1, 0.2):
        offset = np.zeros(dim)
        offset[:20] = shift
        for _ in range(shifted):
            windows.append(rng.normal(size=(200, dim)) + offset)
            kinds.append(f"shift_{shift}")
    return reference, np.asarray(windows, dtype=np.float32), kinds


def mesh_switch(data: Path, trials: int) -> dict[str, object]:
    """The monitor's own window computation and policy (default settings, window 32) on
    PubMedQA questions: a reference of 100 adult-only questions, then 64 more adult-only
    questions and 64 paediatric ones; per random split, the delay from the switch to the first
    drifted window and to the event (K consecutive windows), and false alarms before it."""
    items = json.loads(data.read_text(encoding="utf-8"))
    adult_ids, child_ids = mesh_groups(items)
    adult = [items[k]["QUESTION"] for k in adult_ids]
    child = [items[k]["QUESTION"] for k in child_ids]
    settings = MonitorSettings()
    size = settings.monitor_window
    vectors = embed_questions(items, settings)
    first_drift, event_delay, false_alarms, false_events, window_s = [], [], 0, 0, []
    for trial in range(trials):
        drifted, event, alarms, events, seconds = switch_trial(
            adult, child, vectors, settings, trial
        )
        first_drift.append(drifted)
        event_delay.append(event)
        false_alarms += alarms
        false_events += events
        window_s.extend(seconds)
    detected = [d for d in first_drift if d is not None]
    return {
        "trials": trials,
        "window": size,
        "reference": 100,
        "adult_questions": len(adult),
        "paediatric_questions": len(child),
        # 1 = the first window after the switch.
        "median_windows_to_first_drift": statistics.median(detected) if detected else None,
        "drift_within_2_windows_share": round(
            sum(d is not None and d <= 2 for d in first_drift) / trials, 4
        ),
        "event_within_2_windows_share": round(
            sum(e is not None and e <= 2 for e in event_delay) / trials, 4
        ),
        "false_alarm_windows_before_switch": false_alarms,
        "windows_before_switch": 2 * trials,
        "false_events_before_switch": false_events,
        "median_window_compute_s": round(statistics.median(window_s), 5),
        "steady": steady(items, vectors, settings, trials),
    }


def question_window(
    ref: Reference,
    ref_id: str,
    index: int,
    texts: list[str],
    vectors: dict[str, np.ndarray],
    settings: MonitorSettings,
) -> tuple[events_pb2.DriftWindow, WindowResult]:
    """The monitor's window over questions alone (no retrieval scores, confidences or signals)."""
    size = len(texts)
    return compute_window(
        ref,
        ref_id,
        index,
        texts,
        np.stack([vectors[t] for t in texts]),
        [None] * size,
        [None] * size,
        list(range(size)),
        {},
        settings,
    )


def switch_trial(
    adult: list[str],
    child: list[str],
    vectors: dict[str, np.ndarray],
    settings: MonitorSettings,
    trial: int,
) -> tuple[int | None, int | None, int, int, list[float]]:
    """One random split of ``mesh_switch``: the windows from the switch to the first drifted
    window and to the event (None: neither came), false-alarm windows and false events before
    the switch, and each window's compute seconds."""
    size = settings.monitor_window
    false_alarms, false_events, window_s = 0, 0, []
    rng = np.random.default_rng(trial)
    a = [adult[i] for i in rng.permutation(len(adult))]
    c = [child[i] for i in rng.permutation(len(child))]
    c = (c + c)[: 2 * size]
    ref_texts, stream = a[:100], a[100 : 100 + 2 * size] + c
    ref_id, ref = build_reference(np.stack([vectors[t] for t in ref_texts]), ref_texts, settings)
    policy = DriftPolicy(policy_config(settings), ref_id)
    drifted, event = None, None
    for index in range(len(stream) // size):
        texts = stream[index * size : (index + 1) * size]
        start = time.perf_counter()
        window, result = question_window(ref, ref_id, index, texts, vectors, settings)
        window_s.append(time.perf_counter() - start)
        after_switch = index - 2  # windows 0 and 1 are adult-only
        if window.drift and after_switch < 0:
            false_alarms += 1
        if window.drift and after_switch >= 0 and drifted is None:
            drifted = after_switch + 1
        decided = policy.observe(result) is not None
        if decided and after_switch < 0:
            false_events += 1
        if decided and after_switch >= 0 and event is None:
            event = after_switch + 1
    return drifted, event, false_alarms, false_events, window_s


def embed_questions(items: dict[str, Any], settings: MonitorSettings) -> dict[str, np.ndarray]:
    texts = [v["QUESTION"] for v in items.values()]
    return dict(zip(texts, Embedder.from_settings(settings).embed(texts), strict=True))


def steady(
    items: dict[str, Any], vectors: dict[str, np.ndarray], settings: MonitorSettings, trials: int
) -> dict[str, object]:
    """No drift: per random split, a reference of 180 questions and the other 320 as 10 windows
    of 32 (what the integration test does once); false-alarm windows and false events."""
    texts = [v["QUESTION"] for v in items.values()]
    size = settings.monitor_window
    flagged, events, total = 0, 0, 0
    for trial in range(trials):
        order = np.random.default_rng(1000 + trial).permutation(len(texts))
        ref_texts = [texts[i] for i in order[:180]]
        stream = [texts[i] for i in order[180:]]
        ref_id, ref = build_reference(
            np.stack([vectors[t] for t in ref_texts]), ref_texts, settings
        )  # type: ignore[arg-type]
        policy = DriftPolicy(policy_config(settings), ref_id)  # type: ignore[arg-type]
        for index in range(len(stream) // size):
            chunk = stream[index * size : (index + 1) * size]
            window, result = question_window(ref, ref_id, index, chunk, vectors, settings)
            total += 1
            flagged += window.drift
            events += policy.observe(result) is not None
    return {
        "trials": trials,
        "windows": total,
        "false_alarm_rate": round(flagged / total, 4),
        "false_events": events,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.drift")
    parser.add_argument("--no-drift", type=int, default=200)
    parser.add_argument("--shifted", type=int, default=25, help="windows per shift size")
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data" / "pubmedqa" / "labeled.json",
    )
    parser.add_argument("--switch-trials", type=int, default=20)
    return parser


def run_ours(
    reference: np.ndarray, windows: np.ndarray, permutations: int
) -> tuple[list[float], list[float]]:
    """Our permutation test on each window: the p-values and the seconds each took."""
    ref = Reference.build(reference, [""] * len(reference), topics=8)
    generator = torch.Generator().manual_seed(0)
    ours_p, ours_s = [], []
    for window in windows:
        start = time.perf_counter()
        _, p = mmd2_permutation_test(ref, window, permutations, generator)
        ours_s.append(time.perf_counter() - start)
        ours_p.append(p)
    return ours_p, ours_s


def detection_rates(p_values: list[float], kinds: list[str], alpha: float) -> dict[str, float]:
    """The share of windows flagged (p < alpha), per kind of window."""
    result = {}
    for kind in ("none", "shift_0.1", "shift_0.2"):
        ps = [p for p, k in zip(p_values, kinds, strict=True) if k == kind]
        result[kind] = round(float(np.mean(np.array(ps) < alpha)), 4)
    return result


def run_alibi(reference: np.ndarray, windows: np.ndarray, permutations: int) -> dict[str, Any]:
    """alibi-detect's version, p-values and seconds per window (bench/drift_anchor.py in
    bench/.venv-anchors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "windows.npz"
        np.savez(path, reference=reference, windows=windows)
        reply = subprocess.run(
            [
                str(ANCHORS),
                str(REPO_ROOT / "bench" / "drift_anchor.py"),
                str(path),
                str(permutations),
            ],
            capture_output=True,
            text=True,
            check=False,
            env={"OMP_NUM_THREADS": "1"},
        )
    if reply.returncode != 0:
        print(reply.stderr[-3000:], file=sys.stderr)
        raise SystemExit("alibi-detect run failed")
    return json.loads(reply.stdout.strip().splitlines()[-1])


def compare_with_alibi(
    reference: np.ndarray,
    windows: np.ndarray,
    kinds: list[str],
    ours_p: list[float],
    ours_s: list[float],
    permutations: int,
    alpha: float,
) -> dict[str, object]:
    """alibi-detect's figures on the same windows, and how its time and decisions compare with
    ours."""
    alibi = run_alibi(reference, windows, permutations)
    alibi_rates = detection_rates(alibi["p_values"], kinds, alpha)
    decisions = [(a < alpha) == (o < alpha) for a, o in zip(alibi["p_values"], ours_p, strict=True)]
    return {
        "alibi_detect": {
            "version": alibi["version"],
            "median_window_s": round(statistics.median(alibi["seconds"]), 5),
            "false_alarm_rate": alibi_rates["none"],
            "detection_rate_shift_0.1": alibi_rates["shift_0.1"],
            "detection_rate_shift_0.2": alibi_rates["shift_0.2"],
        },
        "time_ratio_ours_to_alibi": round(
            statistics.median(ours_s) / statistics.median(alibi["seconds"]), 4
        ),
        "same_decision_share": round(float(np.mean(decisions)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    reference, windows, kinds = make_data(0, args.no_drift, args.shifted)
    ours_p, ours_s = run_ours(reference, windows, args.permutations)
    out: dict[str, object] = {
        "reference": list(reference.shape),
        "window": list(windows.shape[1:]),
        "permutations": args.permutations,
        "alpha": args.alpha,
        "threads": 1,
    }
    ours_rates = detection_rates(ours_p, kinds, args.alpha)
    out["ours"] = {
        "median_window_s": round(statistics.median(ours_s), 5),
        "false_alarm_rate": ours_rates["none"],
        "detection_rate_shift_0.1": ours_rates["shift_0.1"],
        "detection_rate_shift_0.2": ours_rates["shift_0.2"],
    }
    if not ANCHORS.exists():
        out["alibi_detect"] = "not installed: run `make bench-anchors`"
    else:
        out.update(
            compare_with_alibi(
                reference, windows, kinds, ours_p, ours_s, args.permutations, args.alpha
            )
        )
    if args.switch_trials:
        out["mesh_switch"] = mesh_switch(args.data, args.switch_trials)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
