"""Knowledge probes scored in process, by the training child (early stopping on its dev probes)
and by the experiments behind the recipe: the same arithmetic as the engine's score mode in
Triton (raw prompt with the tokenizer's special tokens, each candidate's tokens appended, the
sum of their log-probabilities), so a probe the child counts as learned is learned when served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.probes import Probe
from services.common.scoring import candidate_logprobs


def probe_logprobs(
    model: Any, tokenizer: Any, probes: Sequence[Probe], probes_per_pass: int = 8
) -> list[list[float]]:
    """Log-probability of each probe's candidates (true one first), ``probes_per_pass`` probes
    (their prompts once, then a row per candidate) at a time."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()

    def forward(
        ids: Any, mask: Any, positions: Any, past: Any, owners: list[int], keep: int
    ) -> Any:
        return model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=keep,
        )

    out: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(probes), probes_per_pass):
            part = probes[start : start + probes_per_pass]
            prompts = [
                list(tokenizer(p.prefix, add_special_tokens=True)["input_ids"]) for p in part
            ]
            cands = [
                [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in p.candidates]
                for p in part
            ]
            out += candidate_logprobs(forward, prompts, cands, pad)
    if was_training:
        model.train()
    return out


def accuracy(logprobs: Sequence[Sequence[float]]) -> float:
    """Share of probes whose true candidate (the first) scores highest."""
    if not logprobs:
        return 0.0
    return sum(1 for lp in logprobs if max(range(len(lp)), key=lp.__getitem__) == 0) / len(logprobs)
