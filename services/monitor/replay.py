"""Offline replay: the monitor's window statistics over a JSONL stream against a JSONL
reference (each line ``{"text": ...}``), embedded with the configured model.

The live monitor computes its windows with the same function (windowing.compute_window)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knowstream.events.v1 import events_pb2
from services.monitor.drift import Reference
from services.monitor.settings import MonitorSettings
from services.monitor.windowing import compute_window


@dataclass
class Window:
    start: int
    end: int  # exclusive
    record: events_pb2.DriftWindow

    def as_json(self) -> dict[str, Any]:
        w = self.record
        return {
            "window": w.index,
            "start": self.start,
            "end": self.end,
            "mmd2": round(w.mmd2, 6),
            "p_value": round(w.p_value, 4),
            "kl_topics": round(w.kl_topics, 4),
            "kl_terms": round(w.kl_terms, 4),
            "drift": w.drift,
        }


def read_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{path}:{n}: expected {{"text": "..."}} with non-empty text')
            texts.append(text)
    return texts


def windows(
    reference: Reference,
    embeddings: np.ndarray,
    texts: list[str],
    settings: MonitorSettings,
    size: int,
    step: int,
) -> Iterator[Window]:
    """The live monitor's window computation over a stream held in memory."""
    for index, start in enumerate(range(0, len(texts) - size + 1, step)):
        end = start + size
        record, _ = compute_window(
            reference,
            "replay",
            index,
            texts[start:end],
            embeddings[start:end],
            [None] * size,
            [None] * size,
            list(range(start, end)),
            {},
            settings,
        )
        yield Window(start, end, record)


def embed_texts(texts: list[str], settings: MonitorSettings) -> np.ndarray:
    from services.common.embedding import Embedder

    return np.asarray(Embedder.from_settings(settings).embed(texts), dtype=np.float32)
