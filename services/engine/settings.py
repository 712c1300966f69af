"""Settings of the LLM engine that runs inside Triton's python backend."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class EngineSettings(CommonSettings):
    """Settings of the LLM engine inside Triton (read from the environment Triton inherits)."""

    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    llm_threads: int = Field(2, ge=1, description="torch threads of the model in Triton.")
    llm_max_adapters: int = Field(
        8,
        ge=1,
        description=(
            "Adapters kept in memory at once; the least recently used one is unloaded first."
        ),
    )
    llm_max_prompt_tokens: int = Field(
        2048, ge=16, description="Longest prompt, in model tokens; a longer one is refused."
    )
    # Issue 17, measured side by side in one bench.runtimes run (README "Runtimes"): llama.cpp
    # at Q8_0 decodes 8.2x faster than transformers at batch 1 (6.1 vs 49.9 ms/token), and
    # with score mode on F32 weights its chosen candidates are the reference's on 100 % of
    # PubMedQA prompts and knowledge probes (largest log-probability difference 0.025).
    engine_runtime: Literal["transformers", "llamacpp"] = Field(
        "llamacpp",
        description=(
            "What runs the model in Triton: transformers (eager torch fp32 + peft) or llamacpp "
            "(llama.cpp; the model and each adapter converted once to GGUF under the cache "
            "directory)."
        ),
    )
    engine_quant: Literal["f32", "f16", "q8_0", "q4_1"] = Field(
        "q8_0",
        description=(
            "Weight format of the llamacpp runtime (the transformers one is always fp32); "
            "q4_1 is the packaged model's own format."
        ),
    )
    engine_score_quant: Literal["", "f32", "f16", "q8_0", "q4_1"] = Field(
        "f32",
        description=(
            "Weight format the llamacpp runtime scores candidates with (score mode), on a "
            "second copy of the model; empty = KS_ENGINE_QUANT. At q8_0 the chosen candidate "
            "differed from the transformers runtime's on 2-6 % of prompts, at f32 on none."
        ),
    )
    engine_decode_threads: int = Field(
        1,
        ge=0,
        description=(
            "Threads of the llamacpp runtime for a step that decodes one token (a batch of one "
            "request); prompts and batches use KS_LLM_THREADS. 0 = the same as those. On 2 "
            "cores 1 decodes 3x faster than 2 (bench.runtimes)."
        ),
    )
    # bench.overload at 4x capacity (README "Load shedding"): with the room always open, 2
    # makes an admitted request's p99 1.7-2.5x its at-capacity value (a waiter waits for a
    # whole batch); closed while the model sheds (5 s), 1.2-1.3x, and a burst of 10 is answered.
    engine_max_waiting: int = Field(
        2,
        ge=0,
        description=(
            "Requests the model holds beyond a full batch (config.pbtxt max_batch_size), "
            "waiting for a slot; one more is answered RESOURCE_EXHAUSTED at once. It absorbs "
            "a burst at a quiet model; see KS_ENGINE_WAITING_CLOSED_S for sustained overload."
        ),
    )
    engine_waiting_closed_s: float = Field(
        5.0,
        ge=0,
        description=(
            "Seconds the waiting room (KS_ENGINE_MAX_WAITING) stays closed after the model "
            "refused a request: while it sheds, only a free slot admits, so admitted requests "
            "keep their latency at capacity. 0 = always open."
        ),
    )
    engine_kv_tokens: int = Field(
        16384,
        ge=512,
        description=(
            "KV cache cells of the llamacpp runtime, shared by every running request and "
            "score candidate; a step that finds none free fails its requests."
        ),
    )
