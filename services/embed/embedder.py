"""Sentence embeddings with a transformers encoder (mean pooling, L2-normalised), tuned for CPU.

Two levers matter on CPU (measured on PubMedQA contexts, MiniLM-L6, 2 threads): sorting a
micro-batch by length so padding is small, and bfloat16 autocast where the CPU has native bf16
instructions. Both are on by default; bf16 turns itself off on CPUs without them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Embedder:
    def __init__(
        self,
        model_dir: str | Path,
        name: str,
        max_tokens: int = 256,
        batch_size: int = 16,
        bf16: bool | None = None,
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        self.max_tokens = min(max_tokens, self.tokenizer.model_max_length or max_tokens)
        self.batch_size = batch_size
        self.bf16 = cpu_has_bf16() if bf16 is None else bf16
        self.dimension = int(self.model.config.hidden_size)
        # One forward pass at a time: torch already uses every core for one batch, and
        # interleaving two only adds cache thrash.
        self._lock = threading.Lock()
        log.info(
            "embedder %s: dim=%d max_tokens=%d bf16=%s threads=%d",
            name,
            self.dimension,
            self.max_tokens,
            self.bf16,
            torch.get_num_threads(),
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dimension) float32, rows L2-normalised, in input order."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_tokens, padding=False)[
            "input_ids"
        ]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in idx]}, return_tensors="pt"
            )
            out[idx] = self._forward(batch["input_ids"], batch["attention_mask"])
        return out

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        with (
            self._lock,
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16),
        ):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.numpy()
