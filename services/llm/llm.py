"""What a request to the LLM is and what comes back: shared by the engine (inside Triton) and
the infer service's Triton client, without importing torch."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.adapters import BASE

__all__ = ["BASE", "OVERLOADED", "EngineError", "LLMRequest", "LLMResult", "softmax"]

ADAPTER_ID = re.compile(r"^[0-9a-f]{16,64}$")
# How the model's error message starts when it sheds a request (deploy/triton/llm/1/model.py);
# the Triton client reads it as overload.
OVERLOADED = "the model's admission limit is reached"


class EngineError(ValueError):
    """A request the engine refuses; the message goes back to the caller."""


@dataclass
class LLMRequest:
    prompt: str
    system: str = ""
    adapter: str = BASE
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    # Score mode when non-empty: the log-probability of each candidate as the answer.
    candidates: list[str] = field(default_factory=list)
    # The prompt is used as is instead of going through the chat template.
    raw_prompt: bool = False
    # Generate exactly max_new_tokens (benchmarks compare equal work).
    ignore_eos: bool = False
    # Streaming: called with each new piece of text as it is generated.
    on_text: Callable[[str], None] | None = None
    # Polled every few decode steps: a request whose caller has gone stops generating.
    is_cancelled: Callable[[], bool] | None = None


@dataclass
class LLMResult:
    text: str = ""
    adapter: str = BASE
    finish_reason: str = ""  # "stop" (stop sequence or end of turn), "length", "score", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Mean log-probability of the generated tokens (0 when none).
    mean_logprob: float = 0.0
    candidate_logprobs: list[float] = field(default_factory=list)
    compute_ms: float = 0.0
    # Most requests that ran in one forward pass together with this one (itself included).
    batch_size: int = 1
    error: str = ""


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]
