"""The llama.cpp runtime (llama-cpp-python's C API, no server): one model, one context whose
unified KV cache holds every running request as a sequence of its own.

Why llama.cpp (issue 17), of the three CPU runtimes that install here:

- score mode needs the log-probabilities of candidates after a prompt whose KV cache is reused
  per candidate. llama.cpp copies a sequence's cache by reference (``llama_memory_seq_cp``) and
  returns logits at every position asked for, so all candidates of all prompts run in one
  decode call. ONNX Runtime GenAI 0.18 keeps one KV cache per generator (``rewind_to`` gives
  reuse only one candidate after another); OpenVINO GenAI's pipelines return scores of the
  tokens they generate, not of given ones.
- per-request adapters: llama.cpp loads a LoRA file next to the base weights and sets it per
  decode call (``llama_set_adapters_lora``), so rows of one step that name different adapters
  run as one decode call per adapter on the same KV cache (grouping; ONNX Runtime GenAI's
  ``set_active_adapter`` is also per generator). peft adapters convert with a few lines of
  ``gguf`` (services/engine/runtimes/convert.py).
- continuous batching is what llama.cpp's own server does: sequences join and leave a batch
  between decode calls.
- the packaged model is a Q4_1 GGUF file: llama.cpp runs the very weights that the
  transformers runtime dequantises, at Q4_1 (or F32/F16/Q8_0) speed.

Measured on this machine (bench/runtimes.py; 2 threads, batch 1): see README "Runtimes".
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.engine.runtimes import convert
from services.llm.llm import BASE

log = logging.getLogger(__name__)


class LlamaCppError(RuntimeError):
    pass


class LlamaCppRuntime:
    name = "llamacpp"

    def __init__(
        self,
        model_dir: Path,
        *,
        cache_dir: Path,
        threads: int | None = None,
        decode_threads: int | None = None,
        quant: str = "f32",
        kv_tokens: int = 16384,
        max_sequences: int = 64,
        max_batch_tokens: int = 2048,
    ):
        import llama_cpp

        self.lib = llama_cpp
        self.model_dir, self.cache_dir = Path(model_dir), Path(cache_dir)
        self.quant = quant
        path = convert.model_gguf(self.model_dir, self.cache_dir, quant)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = kv_tokens
        cparams.n_batch = max_batch_tokens
        cparams.n_ubatch = min(512, max_batch_tokens)
        cparams.n_seq_max = max_sequences
        # llama.cpp takes n_threads for a decode call of one token (a batch of one request)
        # and n_threads_batch for any other (prompts, several requests). On 2 cores one
        # thread decodes a token of the 135M model 3x faster than two (6.1 vs 18.3 ms at
        # Q8_0): the threads' synchronisation per layer outweighs the work. Steps of several
        # requests stay on two (measured with one there too: 2-4 % fewer tokens/s at 4, 7 % at 8).
        cparams.n_threads_batch = threads or 2
        cparams.n_threads = decode_threads or cparams.n_threads_batch
        # One pool of cells for all sequences: a long prompt may use what short ones leave.
        cparams.kv_unified = True
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise LlamaCppError("llama.cpp could not create a context")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.max_batch_tokens = max_batch_tokens
        self.batch = llama_cpp.llama_batch_init(max_batch_tokens, 0, 1)
        self.free_seqs = list(range(max_sequences - 1, -1, -1))
        self.adapters: dict[str, Any] = {}
        self.active: str | None = BASE
        log.info(
            "llama.cpp runtime: %s (%s), %d threads (%d for one-token steps)",
            path.name,
            quant,
            cparams.n_threads_batch,
            cparams.n_threads,
        )

    def close(self) -> None:
        for adapter in self.adapters.values():
            self.lib.llama_adapter_lora_free(adapter)
        self.adapters.clear()
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def new_batch(self, pad_id: int) -> LlamaCppBatch:
        return LlamaCppBatch(self)

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, path: Path) -> None:
        gguf = convert.adapter_gguf(adapter_id, path, self.model_dir, self.cache_dir)
        adapter = self.lib.llama_adapter_lora_init(self.model, str(gguf).encode())
        if not adapter:
            raise LlamaCppError(f"llama.cpp refused adapter {adapter_id} ({gguf})")
        self.adapters[adapter_id] = adapter

    def unload_adapter(self, adapter_id: str) -> None:
        adapter = self.adapters.pop(adapter_id)
        if self.active == adapter_id:
            self._use(BASE)
        self.lib.llama_adapter_lora_free(adapter)

    def _use(self, adapter_id: str) -> None:
        if adapter_id == self.active:
            return
        if adapter_id == BASE:
            self.lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            handles = (self.lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter_id])
            self.lib.llama_set_adapters_lora(self.ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        self.active = adapter_id

    # -- sequences and decode calls ---------------------------------------------------------
    def take_seq(self) -> int:
        if not self.free_seqs:
            raise LlamaCppError("no free llama.cpp sequence (raise max_sequences)")
        return self.free_seqs.pop()

    def drop_seq(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free_seqs.append(seq)

    def decode(self, items: Sequence[tuple[int, int, int, bool]], adapter: str) -> np.ndarray:
        """Runs ``items`` (token, position, sequence, wants logits) with one adapter; returns
        the logits of the items that want them, in order, [n, vocab] float32."""
        self._use(adapter)
        outputs: list[np.ndarray] = []
        for start in range(0, len(items), self.max_batch_tokens):
            part = items[start : start + self.max_batch_tokens]
            batch = self.batch
            for i, (token, pos, seq, wants) in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = wants
            batch.n_tokens = len(part)
            code = self.lib.llama_decode(self.ctx, batch)
            if code != 0:
                raise LlamaCppError(f"llama.cpp decode failed ({code}; 1 = the KV cache is full)")
            n = sum(1 for item in part if item[3])
            if n:
                ptr = self.lib.llama_get_logits(self.ctx)
                outputs.append(np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy())
        if not outputs:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        return np.concatenate(outputs)

    def decode_rows(
        self, rows: Sequence[tuple[Sequence[int], int, int, str]], all_logits: bool = False
    ) -> list[np.ndarray]:
        """Each row (tokens, first position, sequence, adapter) extends its sequence; rows of
        one adapter share a decode call. Returns per row the logits of its last token
        ([1, vocab]) or, with ``all_logits``, of every token ([len, vocab])."""
        out: list[np.ndarray] = [np.zeros(0)] * len(rows)
        groups: dict[str, list[int]] = {}
        for r, row in enumerate(rows):
            groups.setdefault(row[3], []).append(r)
        for adapter, members in groups.items():
            items: list[tuple[int, int, int, bool]] = []
            for r in members:
                tokens, pos, seq, _ = rows[r]
                last = len(tokens) - 1
                items += [(t, pos + j, seq, all_logits or j == last) for j, t in enumerate(tokens)]
            logits = self.decode(items, adapter)
            at = 0
            for r in members:
                n = len(rows[r][0]) if all_logits else 1
                out[r] = logits[at : at + n]
                at += n
        return out

    # -- score mode -------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[Sequence[int]]],
        adapters: Sequence[str],
        pad_id: int,
    ) -> list[list[float]]:
        """Each prompt runs once on a sequence of its own; every candidate then gets a copy
        of that sequence (shared cells, not copied data) and feeds all but its last token."""
        seqs: list[int] = []
        try:
            for _ in prompts:
                seqs.append(self.take_seq())
            rows = [(p, 0, s, a) for p, s, a in zip(prompts, seqs, adapters, strict=True)]
            first = [torch.log_softmax(torch.from_numpy(x[-1]), -1) for x in self.decode_rows(rows)]
            scores = [[float(first[i][c[0]]) for c in cs] for i, cs in enumerate(candidates)]
            tails: list[tuple[int, int, Sequence[int], int]] = []  # prompt, cand, tokens, seq
            for i, cs in enumerate(candidates):
                for j, c in enumerate(cs):
                    if len(c) > 1:
                        seq = self.take_seq()
                        seqs.append(seq)
                        self.lib.llama_memory_seq_cp(self.memory, seqs[i], seq, -1, -1)
                        tails.append((i, j, c, seq))
            if tails:
                more = self.decode_rows(
                    [(c[:-1], len(prompts[i]), s, adapters[i]) for i, _, c, s in tails], True
                )
                for (i, j, c, _), logits in zip(tails, more, strict=True):
                    logprobs = torch.log_softmax(torch.from_numpy(logits), -1)
                    scores[i][j] += sum(float(logprobs[k - 1, c[k]]) for k in range(1, len(c)))
            return scores
        finally:
            for seq in seqs:
                self.drop_seq(seq)


class LlamaCppBatch:
    """A running batch: a llama.cpp sequence per row, its next position alongside."""

    def __init__(self, runtime: LlamaCppRuntime):
        self.runtime = runtime
        self.seqs: list[int] = []
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def admit(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str]) -> torch.Tensor:
        seqs: list[int] = []
        try:
            for _ in prompts:
                seqs.append(self.runtime.take_seq())
            rows = [(p, 0, s, a) for p, s, a in zip(prompts, seqs, adapters, strict=True)]
            logits = self.runtime.decode_rows(rows)
        except Exception:
            for seq in seqs:
                self.runtime.drop_seq(seq)
            raise
        self.seqs += seqs
        self.lengths += [len(p) for p in prompts]
        return torch.from_numpy(np.concatenate(logits))

    def step(self, tokens: Sequence[int], adapters: Sequence[str]) -> torch.Tensor:
        rows = [
            ([t], n, s, a)
            for t, n, s, a in zip(tokens, self.lengths, self.seqs, adapters, strict=True)
        ]
        logits = self.runtime.decode_rows(rows)
        self.lengths = [n + 1 for n in self.lengths]
        return torch.from_numpy(np.concatenate(logits))

    def keep(self, rows: Sequence[int]) -> None:
        kept = set(rows)
        for i, seq in enumerate(self.seqs):
            if i not in kept:
                self.runtime.drop_seq(seq)
        self.seqs = [self.seqs[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]
