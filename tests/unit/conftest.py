"""Unit-test fixtures shared by the engine and trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.models import resolve_llm_dir
from services.common.settings import CommonSettings


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer: 2 small layers, trains and serves
    in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = resolve_llm_dir("SmolLM2-135M-Instruct", CommonSettings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("tiny-llm")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _no_stack_credentials(monkeypatch):
    """Unit tests start from no credentials: the integration stack (a session fixture that runs
    first in a full run) exports its tokens file and KS_TOKEN for its own clients."""
    import os

    from services.common import clients

    for name in list(os.environ):
        if name in ("KS_AUTH", "KS_AUTH_TOKENS", "KS_AUTH_TOKENS_FILE", "KS_TOKEN") or (
            name.startswith("KS_TLS_")
        ):
            monkeypatch.delenv(name)
    monkeypatch.setattr(clients, "_token_override", None)
    monkeypatch.setattr(clients, "_service_identity", False)
