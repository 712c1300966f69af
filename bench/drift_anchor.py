"""alibi-detect's MMDDrift (pytorch backend) over the windows bench.drift prepared.

Runs in bench/.venv-anchors (alibi-detect pins transformers<5, so it cannot share the main
venv); reads an .npz with ``reference`` and ``windows`` and prints one JSON object with each
window's p-value and time. Only numpy, torch and alibi-detect are imported here.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch


def main() -> int:
    from alibi_detect.cd import MMDDrift

    data = np.load(sys.argv[1])
    permutations = int(sys.argv[2])
    torch.set_num_threads(1)
    reference = data["reference"].astype(np.float32)
    detector = MMDDrift(
        reference, backend="pytorch", p_val=0.05, n_permutations=permutations, device="cpu"
    )
    p_values, seconds = [], []
    for window in data["windows"]:
        start = time.perf_counter()
        result = detector.predict(window.astype(np.float32))
        seconds.append(time.perf_counter() - start)
        p_values.append(float(result["data"]["p_val"]))
    import alibi_detect

    version = alibi_detect.__version__
    print(json.dumps({"version": version, "p_values": p_values, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
