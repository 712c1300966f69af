"""The LLM engine: one copy of the base weights, any number of LoRA adapters (peft), batched
generation with per-request parameters, and a score mode.

It runs inside Triton's python backend (deploy/triton/llm/1/model.py is a thin wrapper around
it) and, for tests and the overhead benchmark, in-process. Requests of one batch may name
different adapters: a batch on one adapter runs it directly, a mixed batch uses peft's per-row
``adapter_names`` (LoRAX-style multi-adapter batching).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from services.infer.llm import ADAPTER_ID, BASE, EngineError, LLMRequest, LLMResult

log = logging.getLogger(__name__)

class LLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        adapter_dir: str | Path,
        *,
        max_adapters: int = 8,
        max_prompt_tokens: int = 2048,
        max_new_tokens: int = 512,
        threads: int | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.adapter_dir = Path(adapter_dir)
        self.max_adapters = max_adapters
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.base.eval()
        self.net: Any = self.base  # becomes the PeftModel once an adapter is loaded
        self.loaded: OrderedDict[str, float] = OrderedDict()  # adapter id -> last use (LRU)
        self.stop_ids = self._stop_token_ids()
        self.pad_id = next(iter(self.stop_ids)) if self.stop_ids else 0
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str) -> float:
        """Loads an adapter from the store; returns the seconds it took (0 if already loaded)."""
        if adapter_id in self.loaded:
            self.loaded.move_to_end(adapter_id)
            return 0.0
        if not ADAPTER_ID.match(adapter_id):
            raise EngineError(f"adapter id {adapter_id!r} is not a content-hash id")
        path = self.adapter_dir / adapter_id
        if not (path / "adapter_config.json").exists():
            raise EngineError(f"adapter {adapter_id} is not in the store ({path})")
        start = time.perf_counter()
        while len(self.loaded) >= self.max_adapters:
            evicted, _ = self.loaded.popitem(last=False)
            self.net.delete_adapter(evicted)
            log.info("evicted adapter %s (LRU, max %d)", evicted, self.max_adapters)
        try:
            if self.net is self.base:
                from peft import PeftModel

                self.net = PeftModel.from_pretrained(self.base, path, adapter_name=adapter_id)
            else:
                self.net.load_adapter(path, adapter_name=adapter_id)
        except Exception as exc:
            raise EngineError(f"adapter {adapter_id} does not fit the base model: {exc}") from exc
        self.net.eval()
        self.loaded[adapter_id] = time.monotonic()
        took = time.perf_counter() - start
        log.info("loaded adapter %s in %.3fs", adapter_id, took)
        return took

    def unload_adapter(self, adapter_id: str) -> bool:
        if adapter_id not in self.loaded:
            return False
        self.net.delete_adapter(adapter_id)
        del self.loaded[adapter_id]
        return True

    def loaded_adapters(self) -> list[str]:
        return list(self.loaded)

    def _adapter_context(
        self, adapters: list[str]
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

    # -- requests ---------------------------------------------------------------------------
    def run(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Serves one batch. A bad request gets a result with ``error`` set; its neighbours are
        served."""
        results = [LLMResult(adapter=r.adapter) for r in requests]
        generate: list[int] = []
        score: list[int] = []
        prompt_ids: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                self._validate(request)
                if request.adapter != BASE:
                    self.load_adapter(request.adapter)
                ids = self.encode_prompt(request)
                if len(ids) > self.max_prompt_tokens:
                    raise EngineError(
                        f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}"
                    )
            except EngineError as exc:
                results[i].error = str(exc)
                results[i].finish_reason = "error"
                continue
            prompt_ids[i] = ids
            results[i].prompt_tokens = len(ids)
            (score if request.candidates else generate).append(i)
        for adapter in {requests[i].adapter for i in prompt_ids}:
            if adapter != BASE:
                self.loaded.move_to_end(adapter)
        with torch.inference_mode():
            if generate:
                self._generate([requests[i] for i in generate], [prompt_ids[i] for i in generate],
                               [results[i] for i in generate])
            if score:
                self._score([requests[i] for i in score], [prompt_ids[i] for i in score],
                            [results[i] for i in score])
        return results

    def _validate(self, request: LLMRequest) -> None:
        if not request.prompt.strip():
            raise EngineError("empty prompt")
        if not 1 <= request.max_new_tokens <= self.max_new_tokens and not request.candidates:
            raise EngineError(
                f"max_new_tokens {request.max_new_tokens} is outside 1..{self.max_new_tokens}"
            )
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise EngineError("temperature must be >= 0 and top_p in (0, 1]")
        if request.candidates and not all(c.strip() for c in request.candidates):
            raise EngineError("empty candidate answer")

    def encode_prompt(self, request: LLMRequest) -> list[int]:
        if request.raw_prompt or not self.has_chat_template:
            text = (request.system + "\n\n" if request.system else "") + request.prompt
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages.append({"role": "user", "content": request.prompt})
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(encoded, dict) or hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        return [int(t) for t in encoded]

    def _stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self.base.generation_config.eos_token_id
        for value in eos if isinstance(eos, list) else [eos]:
            if value is not None:
                ids.add(int(value))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        # Chat models end a turn with their own token, which GGUF metadata does not always name
        # as EOS (SmolLM2's says <|im_start|>).
        for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    # -- generation -------------------------------------------------------------------------
    def _generate(
        self, requests: list[LLMRequest], prompts: list[list[int]], results: list[LLMResult]
    ) -> None:
        start = time.perf_counter()
        batch = len(requests)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every row ends at the same column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        temps = torch.tensor([r.temperature for r in requests])
        top_ps = torch.tensor([r.top_p for r in requests])
        limits = [r.max_new_tokens for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        logprob_sums = [0.0] * batch
        done = [False] * batch
        texts = [""] * batch
        emitted = [0] * batch
        hold = [max((len(s) for s in r.stop), default=1) - 1 for r in requests]
        context, extra = self._adapter_context([r.adapter for r in requests])
        past = None
        step_ids = input_ids
        with context:
            for _ in range(max(limits)):
                out = self.net(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                    logits_to_keep=1,
                    **extra,
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                next_ids = _pick(logits, temps, top_ps)
                for row, request in enumerate(requests):
                    if done[row]:
                        next_ids[row] = self.pad_id
                        continue
                    token = int(next_ids[row])
                    if token in self.stop_ids and not request.ignore_eos:
                        done[row] = True
                        results[row].finish_reason = "stop"
                        continue
                    generated[row].append(token)
                    logprob_sums[row] += float(logprobs[row, token])
                    texts[row] = self.tokenizer.decode(generated[row], skip_special_tokens=True)
                    cut = _find_stop(texts[row], request.stop)
                    if cut is not None:
                        texts[row] = texts[row][:cut]
                        done[row] = True
                        results[row].finish_reason = "stop"
                    elif len(generated[row]) >= limits[row]:
                        done[row] = True
                        results[row].finish_reason = "length"
                    if request.on_text is not None:
                        # Hold back what could be the start of a stop sequence or half a
                        # multi-byte character; the final flush sends the rest.
                        safe = len(texts[row]) if done[row] else len(texts[row]) - hold[row]
                        while safe > emitted[row] and texts[row][safe - 1] == "\ufffd":
                            safe -= 1
                        if safe > emitted[row]:
                            request.on_text(texts[row][emitted[row] : safe])
                            emitted[row] = safe
                if all(done):
                    break
                step_ids = next_ids.unsqueeze(1)
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
        elapsed_ms = (time.perf_counter() - start) * 1000
        for row, request in enumerate(requests):
            result = results[row]
            result.text = texts[row]
            result.completion_tokens = len(generated[row])
            result.mean_logprob = logprob_sums[row] / max(1, len(generated[row]))
            result.finish_reason = result.finish_reason or "length"
            result.compute_ms = elapsed_ms
            if request.on_text is not None and len(texts[row]) > emitted[row]:
                request.on_text(texts[row][emitted[row] :])

    # -- score mode -------------------------------------------------------------------------
    def _score(
        self, requests: list[LLMRequest], prompts: list[list[int]], results: list[LLMResult]
    ) -> None:
        """Log-probability of each candidate (sum over its tokens) after the prompt.

        A request whose candidates are all single tokens costs one row (one forward pass reads
        every candidate's next-token probability); others take a row per candidate.
        """
        start = time.perf_counter()
        rows: list[list[int]] = []
        row_adapters: list[str] = []
        # (request, candidate, row, tokens appended to the prompt in that row, targets)
        plan: list[tuple[int, int, int, int, list[int]]] = []
        for qi, (request, ids) in enumerate(zip(requests, prompts, strict=True)):
            cand_ids = [
                list(self.tokenizer(c, add_special_tokens=False)["input_ids"])
                for c in request.candidates
            ]
            if all(len(c) == 1 for c in cand_ids):
                rows.append(ids)
                row_adapters.append(request.adapter)
                for ci, c in enumerate(cand_ids):
                    plan.append((qi, ci, len(rows) - 1, 0, c))
            else:
                for ci, c in enumerate(cand_ids):
                    rows.append(ids + c[:-1])
                    row_adapters.append(request.adapter)
                    plan.append((qi, ci, len(rows) - 1, len(c) - 1, c))
        width = max(len(r) for r in rows)
        keep = max(appended for *_, appended, _ in plan) + 1
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        context, extra = self._adapter_context(row_adapters)
        with context:
            out = self.net(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=keep,
                **extra,
            )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [rows, keep, vocab]
        scores = [[0.0] * len(r.candidates) for r in requests]
        for qi, ci, r, appended, targets in plan:
            # The logit at column keep-1-appended+j predicts target j.
            first = keep - 1 - appended
            scores[qi][ci] = float(
                sum(logprobs[r, first + j, t] for j, t in enumerate(targets))
            )
        elapsed_ms = (time.perf_counter() - start) * 1000
        for qi, result in enumerate(results):
            result.candidate_logprobs = scores[qi]
            best = max(range(len(scores[qi])), key=scores[qi].__getitem__)
            result.text = requests[qi].candidates[best]
            result.finish_reason = "score"
            result.mean_logprob = scores[qi][best]
            result.compute_ms = elapsed_ms


def _pick(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Next token per row: greedy where temperature is 0, else nucleus sampling."""
    chosen = logits.argmax(dim=-1)
    sampled = (temps > 0).nonzero().squeeze(1)
    if sampled.numel():
        probs = torch.softmax(logits[sampled] / temps[sampled, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_ps[sampled, None]
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_probs, 1)
        chosen[sampled] = order.gather(1, pick).squeeze(1)
    return chosen


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
