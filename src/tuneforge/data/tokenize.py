"""Batched tokenization, cached on disk by fingerprint.

Tokenization runs once through ``datasets.Dataset.map(batched=True)`` with the fast (Rust) tokenizer; the
result is cached as Arrow under ``$TUNEFORGE_CACHE/tokenized`` keyed by a fingerprint of the tokenizer,
the texts and the settings, so a second run (or a resume) on the same data skips it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "tokenize_texts"]


def cache_root() -> Path:
    """Root of tuneforge's caches: ``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``."""
    root = os.environ.get("TUNEFORGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tuneforge"


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    return Hasher.hash([type(tokenizer).__name__, body, tokenizer.padding_side, tokenizer.truncation_side])


def tokenize_texts(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    max_length: int,
    keep_token_types: bool = False,
) -> dict[str, list]:
    """Tokenize (pairs of) texts without padding; returns ``input_ids`` (and ``token_type_ids``)."""
    import datasets
    from datasets.fingerprint import Hasher

    datasets.disable_progress_bars()
    columns: dict[str, list] = {"a": list(texts)}
    if pairs is not None:
        columns["b"] = list(pairs)
    key = Hasher.hash([_tokenizer_fingerprint(tokenizer), max_length, keep_token_types, columns])
    cache_dir = cache_root() / "tokenized"
    cache_dir.mkdir(parents=True, exist_ok=True)
    out_cols = ["input_ids", *(["token_type_ids"] if keep_token_types else [])]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["a"], batch.get("b"), truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=keep_token_types)
        return {k: enc[k] for k in out_cols}

    ds = datasets.Dataset.from_dict(columns)
    ds = ds.map(encode, batched=True, batch_size=2000, remove_columns=list(columns),
                cache_file_name=str(cache_dir / f"{key}.arrow"), new_fingerprint=key, load_from_cache_file=True)
    return {k: ds[k] for k in out_cols}
