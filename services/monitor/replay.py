"""Offline replay: the monitor's window statistics over a JSONL stream against a JSONL
reference (each line ``{"text": ...}``), embedded with the configured model.

The live monitor (next step of issue 4) slides the same windows with the same code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.monitor.drift import Reference, WindowStats, window_stats
from services.monitor.settings import MonitorSettings


@dataclass
class Window:
    index: int
    start: int
    end: int  # exclusive
    stats: WindowStats
    drift: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "window": self.index,
            "start": self.start,
            "end": self.end,
            "mmd2": round(self.stats.mmd2, 6),
            "p_value": round(self.stats.p_value, 4),
            "kl_topics": round(self.stats.kl_topics, 4),
            "kl_terms": round(self.stats.kl_terms, 4),
            "drift": self.drift,
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


def is_drift(stats: WindowStats, settings: MonitorSettings) -> bool:
    if stats.p_value < settings.monitor_p_value:
        return True
    if settings.monitor_kl_threshold and stats.kl_topics > settings.monitor_kl_threshold:
        return True
    return bool(settings.monitor_mmd_threshold and stats.mmd2 > settings.monitor_mmd_threshold)


def windows(
    reference: Reference,
    embeddings: np.ndarray,
    texts: list[str],
    settings: MonitorSettings,
    size: int,
    step: int,
) -> Iterator[Window]:
    generator = torch.Generator().manual_seed(settings.monitor_seed)
    for index, start in enumerate(range(0, len(texts) - size + 1, step)):
        end = start + size
        stats = window_stats(
            reference,
            embeddings[start:end],
            texts[start:end],
            settings.monitor_permutations,
            generator,
        )
        yield Window(index, start, end, stats, is_drift(stats, settings))


def embed_texts(texts: list[str], settings: MonitorSettings) -> np.ndarray:
    from services.common.embedding import Embedder

    return np.asarray(Embedder.from_settings(settings).embed(texts), dtype=np.float32)
