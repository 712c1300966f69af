"""Score mode's arithmetic, shared by the engine in Triton and the training child: the
log-probability of each candidate continuation of a prompt (sum over its tokens).

The prompt is run once and its KV cache repeated for every candidate, which then costs only its
own tokens: a knowledge probe's five candidates share a sentence start, and a probe with
retrieved passages shares several hundred prompt tokens, so running each candidate with the
whole prompt (a row per candidate) cost up to five times as much.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# (input ids, attention mask, position ids, past KV or None, owner request of each row, logits
# to keep) -> the model's output (logits, past_key_values)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, list[int], int], Any]


def candidate_logprobs(
    forward: Forward,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
) -> list[list[float]]:
    """``candidates[i]`` are token lists continuing ``prompts[i]``; returns their summed
    log-probabilities. Prompts are left-padded into one batch; every candidate then becomes a
    row of its own on a copy of its prompt's cache, right-padded."""
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(list(p))
        mask[r, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = forward(ids, mask, positions, None, list(range(n)), 1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [prompts, vocab]
    owners = [i for i, cs in enumerate(candidates) for _ in cs]
    flat = [list(c) for cs in candidates for c in cs]
    scores = [float(first[owners[r], c[0]]) for r, c in enumerate(flat)]
    tail = max(len(c) - 1 for c in flat)
    if tail > 0:
        index = torch.tensor(owners)
        past = out.past_key_values
        for layer in past.layers:
            layer.keys = layer.keys[index]
            layer.values = layer.values[index]
        rows = len(flat)
        more = torch.full((rows, tail), pad_id, dtype=torch.long)
        more_mask = torch.zeros((rows, tail), dtype=torch.long)
        for r, c in enumerate(flat):
            if len(c) > 1:
                more[r, : len(c) - 1] = torch.tensor(c[:-1])
                more_mask[r, : len(c) - 1] = 1
        full_mask = torch.cat([mask[index], more_mask], dim=1)
        start = mask.sum(-1)[index].unsqueeze(1)  # each prompt's real length
        more_positions = start + torch.arange(tail).unsqueeze(0)
        out2 = forward(more, full_mask, more_positions, past, owners, tail)
        logprobs = torch.log_softmax(out2.logits.float(), dim=-1)  # [rows, tail, vocab]
        for r, c in enumerate(flat):
            for j in range(1, len(c)):
                scores[r] += float(logprobs[r, j - 1, c[j]])
    out_scores: list[list[float]] = [[] for _ in prompts]
    for r, owner in enumerate(owners):
        out_scores[owner].append(scores[r])
    return out_scores
