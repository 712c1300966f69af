"""``knowstream drift replay``: the drift detector over files, offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.monitor.settings import MonitorSettings


def cmd_replay(args: argparse.Namespace, _settings: object) -> int:
    from services.monitor.drift import Reference
    from services.monitor.replay import embed_texts, read_texts, windows

    settings = MonitorSettings()
    try:
        ref_texts = read_texts(Path(args.reference))
        stream_texts = read_texts(Path(args.stream))
    except (OSError, ValueError) as exc:
        print(f"drift replay: {exc}", file=sys.stderr)
        return 2
    size = args.window or settings.monitor_window
    step = args.step or settings.monitor_step or size
    if len(stream_texts) < size:
        print(
            f"drift replay: the stream has {len(stream_texts)} lines, fewer than one window "
            f"({size})",
            file=sys.stderr,
        )
        return 2
    embeddings = embed_texts(ref_texts + stream_texts, settings)
    reference = Reference.build(
        embeddings[: len(ref_texts)],
        ref_texts,
        topics=min(settings.monitor_topics, max(2, len(ref_texts) // 8)),
        vocabulary_size=settings.monitor_vocabulary,
        seed=settings.monitor_seed,
    )
    first = None
    count = 0
    for window in windows(
        reference, embeddings[len(ref_texts) :], stream_texts, settings, size, step
    ):
        count += 1
        if window.drift and first is None:
            first = window.end
        if args.json:
            print(json.dumps(window.as_json()))
        else:
            w = window.as_json()
            mark = "DRIFT" if w["drift"] else "-"
            print(
                f"window {w['window']:>3} [{w['start']}, {w['end']}): mmd2={w['mmd2']:.5f} "
                f"p={w['p_value']:.3f} kl_topics={w['kl_topics']:.3f} "
                f"kl_terms={w['kl_terms']:.3f} {mark}"
            )
    summary = {"first_drift_end": first, "windows": count}
    print(json.dumps(summary) if args.json else f"first drift ends at {first}; {count} windows")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("drift", help="drift detection")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("replay", help="replay the detector over a JSONL stream, offline")
    a.add_argument("--reference", required=True, help='JSONL of {"text": ...}')
    a.add_argument("--stream", required=True, help='JSONL of {"text": ...}')
    a.add_argument("--window", type=int, default=0, help="window size (default: setting)")
    a.add_argument("--step", type=int, default=0, help="default: a full window")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_replay)
