"""Our MMD permutation test against alibi-detect's MMDDrift(backend='pytorch').

Same reference (1,000 x 384), same windows (200 x 384), 100 permutations, one thread each:
200 windows without drift, and windows whose mean is shifted by 0.1 and 0.2 in 20 of the 384
dimensions. alibi-detect runs in bench/.venv-anchors (`make bench-anchors`).

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

import numpy as np
import torch

from services.common.settings import REPO_ROOT
from services.monitor.drift import Reference, mmd2_permutation_test

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift")
    parser.add_argument("--no-drift", type=int, default=200)
    parser.add_argument("--shifted", type=int, default=25, help="windows per shift size")
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reference, windows, kinds = make_data(0, args.no_drift, args.shifted)
    ref = Reference.build(reference, [""] * len(reference), topics=8)
    generator = torch.Generator().manual_seed(0)
    ours_p, ours_s = [], []
    for window in windows:
        start = time.perf_counter()
        _, p = mmd2_permutation_test(ref, window, args.permutations, generator)
        ours_s.append(time.perf_counter() - start)
        ours_p.append(p)
    out: dict[str, object] = {
        "reference": list(reference.shape),
        "window": list(windows.shape[1:]),
        "permutations": args.permutations,
        "alpha": args.alpha,
        "threads": 1,
    }

    def rates(p_values: list[float]) -> dict[str, float]:
        result = {}
        for kind in ("none", "shift_0.1", "shift_0.2"):
            ps = [p for p, k in zip(p_values, kinds, strict=True) if k == kind]
            result[kind] = round(float(np.mean(np.array(ps) < args.alpha)), 4)
        return result

    ours_rates = rates(ours_p)
    out["ours"] = {
        "median_window_s": round(statistics.median(ours_s), 5),
        "false_alarm_rate": ours_rates["none"],
        "detection_rate_shift_0.1": ours_rates["shift_0.1"],
        "detection_rate_shift_0.2": ours_rates["shift_0.2"],
    }
    if not ANCHORS.exists():
        out["alibi_detect"] = "not installed: run `make bench-anchors`"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "windows.npz"
            np.savez(path, reference=reference, windows=windows)
            reply = subprocess.run(
                [
                    str(ANCHORS),
                    str(REPO_ROOT / "bench" / "drift_anchor.py"),
                    str(path),
                    str(args.permutations),
                ],
                capture_output=True,
                text=True,
                check=False,
                env={"OMP_NUM_THREADS": "1"},
            )
        if reply.returncode != 0:
            print(reply.stderr[-3000:], file=sys.stderr)
            raise SystemExit("alibi-detect run failed")
        alibi = json.loads(reply.stdout.strip().splitlines()[-1])
        alibi_rates = rates(alibi["p_values"])
        decisions = [
            (a < args.alpha) == (o < args.alpha)
            for a, o in zip(alibi["p_values"], ours_p, strict=True)
        ]
        out["alibi_detect"] = {
            "version": alibi["version"],
            "median_window_s": round(statistics.median(alibi["seconds"]), 5),
            "false_alarm_rate": alibi_rates["none"],
            "detection_rate_shift_0.1": alibi_rates["shift_0.1"],
            "detection_rate_shift_0.2": alibi_rates["shift_0.2"],
        }
        out["time_ratio_ours_to_alibi"] = round(
            statistics.median(ours_s) / statistics.median(alibi["seconds"]), 4
        )
        out["same_decision_share"] = round(float(np.mean(decisions)), 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
