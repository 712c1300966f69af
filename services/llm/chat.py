"""Token ids of a prompt as the model sees it, shared by the engine (serving) and the trainer, so
an adapter is trained on exactly the sequences it is later asked with."""

from __future__ import annotations

from typing import Any


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "keys"):  # newer transformers return a BatchEncoding
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def encode_prompt(tokenizer: Any, system: str, prompt: str, raw: bool = False) -> list[int]:
    """The prompt through the model's chat template (system + user turn, then the start of the
    assistant turn); without a template, or with ``raw``, the text as is."""
    if raw or not getattr(tokenizer, "chat_template", None):
        text = (system + "\n\n" if system else "") + prompt
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_exchange(
    tokenizer: Any, system: str, prompt: str, reply: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the reply as the assistant's turn, ending the way the chat
    template ends a turn (or with EOS), for training on the reply only."""
    prefix = encode_prompt(tokenizer, system, prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full[: len(prefix)] == prefix:
            return prefix, full[len(prefix) :]
    reply_ids = list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        reply_ids.append(int(tokenizer.eos_token_id))
    return prefix, reply_ids
