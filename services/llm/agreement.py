"""How far two answers agree: shadow pairs (infer) and the rollout policy (trainer) compare
live and candidate answers with it."""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+")


def agreement(a: str, b: str, scored: bool = False) -> float:
    """1.0 for the same answer. Score mode compares the chosen candidates; free text is
    compared by token F1 (SQuAD-style, case-insensitive)."""
    ta, tb = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    if scored:
        return 1.0 if ta == tb else 0.0
    if not ta and not tb:
        return 1.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ta), common / len(tb)
    return 2 * precision * recall / (precision + recall)
