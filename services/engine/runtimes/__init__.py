"""Model runtimes behind the LLM engine (issue 17): what runs the forward passes, keeps the KV
cache and applies LoRA adapters. The engine above them owns everything else (validation,
tokenising, the adapter LRU, sampling, stop strings, streaming, cancellation, continuous
batching), so every runtime gets those the same way.

- ``transformers`` (services/engine/runtimes/hf.py): eager torch fp32 + peft, the reference.
- ``llamacpp`` (services/engine/runtimes/llamacpp.py): llama.cpp through llama-cpp-python,
  with the model and adapters converted once to GGUF (services/engine/runtimes/convert.py). Why
  llama.cpp and not ONNX Runtime GenAI or OpenVINO GenAI: see that module's docstring.

``KS_ENGINE_RUNTIME`` selects one (services/infer/settings.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

RUNTIMES = ("transformers", "llamacpp")


class BatchState(Protocol):
    """The KV cache of a running batch: one row per generating request, in admission order."""

    def admit(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str]) -> torch.Tensor:
        """Prefills ``prompts`` as new rows after the existing ones; returns the next-token
        logits after each prompt, [len(prompts), vocab]."""
        ...

    def step(self, tokens: Sequence[int], adapters: Sequence[str]) -> torch.Tensor:
        """Feeds one token to every row (in row order); returns [rows, vocab] logits."""
        ...

    @property
    def width(self) -> int:
        """Positions the cache spans per row (the longest row); 0 once every row has left."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Keeps only these rows (indices into the current rows, in order); frees the rest."""
        ...


class Runtime(Protocol):
    name: str

    def new_batch(self, pad_id: int) -> BatchState: ...

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[Sequence[int]]],
        adapters: Sequence[str],
        pad_id: int,
    ) -> list[list[float]]:
        """Summed log-probability of each candidate token list after its prompt, the prompt's
        KV cache reused for all of its candidates."""
        ...

    def load_adapter(self, adapter_id: str, path: Path) -> None:
        """Makes a peft adapter from the store usable under its id (raises on a mismatch)."""
        ...

    def unload_adapter(self, adapter_id: str) -> None: ...


class SplitRuntime:
    """Generation on one runtime, score mode on another, the same adapters loaded in both.

    Why (bench.runtimes, issue 17): llama.cpp decodes 8x faster than the transformers runtime
    at Q8_0, but Q8_0's candidate log-probabilities chose another answer than the reference on
    2-6 % of prompts; at F32 on none (largest difference 0.025). Score mode is one forward pass
    per prompt, so F32 costs it little; decoding is step after step, where Q8_0 pays off.
    """

    def __init__(self, generator: Runtime, scorer: Runtime):
        self.generator, self.scorer = generator, scorer
        self.name = generator.name

    def new_batch(self, pad_id: int) -> BatchState:
        return self.generator.new_batch(pad_id)

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[Sequence[int]]],
        adapters: Sequence[str],
        pad_id: int,
    ) -> list[list[float]]:
        return self.scorer.score(prompts, candidates, adapters, pad_id)

    def load_adapter(self, adapter_id: str, path: Path) -> None:
        self.generator.load_adapter(adapter_id, path)
        try:
            self.scorer.load_adapter(adapter_id, path)
        except Exception:
            self.generator.unload_adapter(adapter_id)  # usable in both or in neither
            raise

    def unload_adapter(self, adapter_id: str) -> None:
        self.generator.unload_adapter(adapter_id)
        self.scorer.unload_adapter(adapter_id)


def create_runtime(
    name: str, model_dir: Path, *, cache_dir: Path, threads: int | None, **options: object
) -> Runtime:
    """The runtime called ``name`` on the safetensors model in ``model_dir``; conversions it
    needs land in ``cache_dir``. For llama.cpp, a ``score_quant`` other than ``quant`` gives a
    :class:`SplitRuntime` (scores on weights of that format)."""
    if name == "transformers":
        from services.engine.runtimes.hf import TransformersRuntime

        return TransformersRuntime(model_dir, threads=threads)
    if name == "llamacpp":
        from services.engine.runtimes.llamacpp import LlamaCppRuntime

        score_quant = str(options.pop("score_quant", "") or "")

        def make(**extra: object) -> LlamaCppRuntime:
            kwargs: dict[str, Any] = options | extra
            return LlamaCppRuntime(model_dir, cache_dir=cache_dir, threads=threads, **kwargs)

        generator = make()
        if not score_quant or score_quant == generator.quant:
            return generator
        return SplitRuntime(generator, make(quant=score_quant))
    raise ValueError(f"unknown engine runtime {name!r} ({', '.join(RUNTIMES)})")
