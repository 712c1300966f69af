"""Conversions for the llama.cpp runtime, done once and cached under the cache directory:

- the base model (the same safetensors the transformers runtime loads) to a GGUF file, F32,
  then F16/Q8_0/Q4_1 by llama.cpp's own quantiser;
- a peft LoRA adapter from the store to a GGUF LoRA adapter.

Cache layout: ``<cache>/llamacpp/<base hash>/model-<quant>.gguf`` and
``<cache>/llamacpp/<base hash>/adapters/<adapter id>.gguf``, where the base hash covers the
model's config and weights, and the adapter id is the store's content hash (an adapter is
converted for one base model, whose head layout it is permuted for). Files are written to a
temporary name and renamed, so a crash never leaves a half file under the final name.

Only the Llama architecture (SmolLM2's) is converted. llama.cpp keeps Q and K rows in an
interleaved RoPE order: their weights (and a LoRA's B matrices for them) are permuted as
llama.cpp's own convert_hf_to_gguf.py does. The tokenizer goes into the file because llama.cpp
refuses a model without one, but it is never used: the engine feeds it the model tokenizer's
ids (ONNX Runtime GenAI's own tokenizer counted 1,984 tokens for a 685-token prompt).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

QUANTS = ("f32", "f16", "q8_0", "q4_1")
# llama.cpp's llama_ftype values (include/llama.h).
_FTYPES = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def base_hash(model_dir: Path) -> str:
    """Content hash of the model's config and weights. Hashed once per process for files of
    the same size and mtime: every adapter load asks for it, and reading the 513 MiB again
    was nearly all of a load's 0.31 s."""
    names = ("config.json", *sorted(p.name for p in model_dir.glob("*.safetensors")))
    stats = tuple((n, (st := (model_dir / n).stat()).st_size, st.st_mtime_ns) for n in names)
    return _hash_files(model_dir.resolve(), stats)


@functools.lru_cache(maxsize=8)
def _hash_files(model_dir: Path, stats: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stats:
        with open(model_dir / name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def cache_root(model_dir: Path, cache_dir: Path) -> Path:
    return cache_dir / "llamacpp" / base_hash(model_dir)


def model_gguf(model_dir: Path, cache_dir: Path, quant: str) -> Path:
    """The GGUF file of the model at ``quant``, converted on first use."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r} ({', '.join(QUANTS)})")
    root = cache_root(model_dir, cache_dir)
    target = root / f"model-{quant}.gguf"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    f32 = root / "model-f32.gguf"
    if not f32.exists():
        _atomic(f32, lambda tmp: write_model(model_dir, tmp))
    if quant != "f32":
        _atomic(target, lambda tmp: quantize(f32, tmp, quant))
    return target


def adapter_gguf(adapter_id: str, adapter_path: Path, model_dir: Path, cache_dir: Path) -> Path:
    target = cache_root(model_dir, cache_dir) / "adapters" / f"{adapter_id}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic(target, lambda tmp: write_adapter(adapter_path, model_dir, tmp))
    return target


def _atomic(target: Path, write: Any) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)


def _config(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ValueError(
            f"the llama.cpp runtime converts Llama models, not {config.get('model_type')}"
        )
    return config


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved one."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors.numpy import load_file

    for file in sorted(model_dir.glob("*.safetensors")):
        yield from load_file(file).items()


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers Llama tensor (None: not a tensor it has)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    module = ".".join(parts[3:-1])
    short = _LAYER_NAMES.get(module)
    return f"blk.{parts[2]}.{short}.{parts[-1]}" if short else None


def write_model(model_dir: Path, out: Path) -> None:
    import gguf

    config = _config(model_dir)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_FTYPES["f32"])
    _add_tokenizer(writer, model_dir, config)
    tied = config.get("tie_word_embeddings", False)
    for name, tensor in _tensors(model_dir):
        target = gguf_name(name)
        if target is None or (tied and target == "output.weight"):
            continue
        data = tensor.astype(np.float32)
        if target.endswith("attn_q.weight"):
            data = _permute(data, heads)
        elif target.endswith("attn_k.weight"):
            data = _permute(data, kv_heads)
        writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: Any, model_dir: Path, config: dict[str, Any]) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # unused
    for text, i in vocab.items():
        tokens[i], types[i] = text, (3 if text in special else 1)  # control / normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
    ):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            add(int(value))


def quantize(source: Path, out: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[quant]
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {source} to {quant}")


def write_adapter(adapter_path: Path, model_dir: Path, out: Path) -> None:
    """A peft LoRA (any rank, attention and MLP projections) as a llama.cpp LoRA adapter.
    llama.cpp scales by alpha / rank, so alpha is written as peft's scaling x rank (which also
    covers rsLoRA's alpha / sqrt(rank))."""
    import gguf
    from safetensors.numpy import load_file

    config = _config(model_dir)
    peft = json.loads((adapter_path / "adapter_config.json").read_text(encoding="utf-8"))
    rank, alpha = int(peft["r"]), float(peft["lora_alpha"])
    scaling = alpha / rank**0.5 if peft.get("use_rslora") else alpha / rank
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights = load_file(adapter_path / "adapter_model.safetensors")
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", scaling * rank)
    for name, tensor in sorted(weights.items()):
        if ".lora_A." not in name and ".lora_B." not in name:
            raise ValueError(f"adapter tensor {name} is not a LoRA matrix (only LoRA converts)")
        kind = "lora_a" if ".lora_A." in name else "lora_b"
        hf = name.removeprefix("base_model.model.").replace(
            f".{'lora_A' if kind == 'lora_a' else 'lora_B'}", ""
        )
        target = gguf_name(hf)
        if target is None or not target.startswith("blk."):
            raise ValueError(f"adapter targets {hf}, which the llama.cpp runtime cannot apply")
        data = tensor.astype(np.float32)
        if kind == "lora_b" and target.endswith("attn_q.weight"):
            data = _permute(data, heads)
        elif kind == "lora_b" and target.endswith("attn_k.weight"):
            data = _permute(data, kv_heads)
        writer.add_tensor(f"{target}.{kind}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
