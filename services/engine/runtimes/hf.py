"""The transformers runtime: eager torch fp32 with peft LoRA adapters, the engine as it was
before issue 17 (and the reference the other runtimes are measured against).

Requests of one batch may name different adapters: a batch on one adapter runs it directly, a
mixed batch uses peft's per-row ``adapter_names`` (LoRAX-style multi-adapter batching).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from services.common.scoring import candidate_logprobs
from services.llm.llm import BASE


class TransformersRuntime:
    name = "transformers"

    def __init__(self, model_dir: Path, *, threads: int | None = None):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.base.eval()
        self.net: Any = self.base  # becomes the PeftModel once an adapter is loaded

    def new_batch(self, pad_id: int) -> TransformersBatch:
        return TransformersBatch(self, pad_id)

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, path: Path) -> None:
        # Lazy loads happen inside the scheduler's inference mode; weights created there would
        # be inference tensors, and peft's next load (which sets requires_grad on the existing
        # LoRA layers) would fail on them.
        with torch.inference_mode(False), torch.no_grad():
            if self.net is self.base:
                from peft import PeftModel

                self.net = PeftModel.from_pretrained(self.base, path, adapter_name=adapter_id)
            else:
                self.net.load_adapter(path, adapter_name=adapter_id)
        self.net.eval()

    def unload_adapter(self, adapter_id: str) -> None:
        self.net.delete_adapter(adapter_id)

    def _adapter_context(
        self, adapters: Sequence[str]
    ) -> tuple[AbstractContextManager[Any], dict[str, Any]]:
        if self.net is self.base:
            return nullcontext(), {}
        distinct = set(adapters)
        if distinct == {BASE}:
            return self.net.disable_adapter(), {}
        if len(distinct) == 1:
            self.net.set_adapter(adapters[0])
            return nullcontext(), {}
        return nullcontext(), {"adapter_names": ["__base__" if a == BASE else a for a in adapters]}

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        adapters: Sequence[str],
        past: Any,
        keep: int = 1,
    ) -> Any:
        """One forward pass keeping the last ``keep`` positions' logits, extending ``past``."""
        context, extra = self._adapter_context(adapters)
        with context:
            return self.net(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=keep,
                **extra,
            )

    # -- score mode -------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[Sequence[int]]],
        adapters: Sequence[str],
        pad_id: int,
    ) -> list[list[float]]:
        def forward(
            ids: torch.Tensor,
            mask: torch.Tensor,
            positions: torch.Tensor,
            past: Any,
            owners: list[int],
            keep: int,
        ) -> Any:
            return self.forward(ids, mask, positions, [adapters[o] for o in owners], past, keep)

        return candidate_logprobs(forward, prompts, candidates, pad_id)


class TransformersBatch:
    """Rows are left-padded, so each row's tokens are the rightmost ``length`` columns of the
    cache; merging pads the shorter cache on the left, and columns that are padding for every
    remaining row are cut off after rows leave, so the cache never outgrows its longest row."""

    def __init__(self, runtime: TransformersRuntime, pad_id: int):
        self.runtime = runtime
        self.pad_id = pad_id
        self.past: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        # Tokens of each row in the KV cache (prompt + fed tokens).
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def admit(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str]) -> torch.Tensor:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, ids in enumerate(prompts):
            input_ids[r, width - len(ids) :] = torch.tensor(list(ids))
            mask[r, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.runtime.forward(input_ids, mask, positions, adapters, DynamicCache())
        self._merge(out.past_key_values, mask)
        self.lengths.extend(len(ids) for ids in prompts)
        return out.logits[:, -1, :]

    def step(self, tokens: Sequence[int], adapters: Sequence[str]) -> torch.Tensor:
        ids = torch.tensor([[t] for t in tokens])
        positions = torch.tensor([[n] for n in self.lengths])
        self.mask = torch.cat([self.mask, torch.ones((len(tokens), 1), dtype=torch.long)], 1)
        out = self.runtime.forward(ids, self.mask, positions, adapters, self.past)
        self.past = out.past_key_values
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1, :]

    def keep(self, rows: Sequence[int]) -> None:
        if len(rows) == len(self.lengths):
            return
        self.lengths = [self.lengths[i] for i in rows]
        if not rows:
            self.past, self.mask = None, torch.zeros((0, 0), dtype=torch.long)
            return
        self.past.batch_select_indices(torch.tensor(list(rows)))
        self.mask = self.mask[list(rows)]
        trim = min(self.width - n for n in self.lengths)
        if trim > 0:
            for layer in self.past.layers:
                layer.keys = layer.keys[:, :, trim:, :]
                layer.values = layer.values[:, :, trim:, :]
            self.mask = self.mask[:, trim:]

    def _merge(self, past: Any, mask: torch.Tensor) -> None:
        if not self.lengths:
            self.past, self.mask = past, mask
            return
        width = max(self.width, int(mask.shape[1]))

        def pad(t: torch.Tensor, to: int) -> torch.Tensor:
            if t.shape[-2] == to:
                return t
            shape = (*t.shape[:-2], to - t.shape[-2], t.shape[-1])
            return torch.cat([t.new_zeros(shape), t], dim=-2)

        for mine, theirs in zip(self.past.layers, past.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, width), pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([pad(mine.values, width), pad(theirs.values, width)], dim=0)

        def pad_mask(m: torch.Tensor) -> torch.Tensor:
            return torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1)

        self.mask = torch.cat([pad_mask(self.mask), pad_mask(mask)], dim=0)
