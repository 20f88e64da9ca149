"""Models built from scratch (random weights) around a tokenizer, and the one loading entry for objectives.

``model.init=scratch model.architecture=gpt2 model.tokenizer=DIR model.size=small`` builds a randomly
initialised transformers model (``AutoModelFor*.from_config``, so transformers' own init recipes apply)
whose vocabulary size and special-token ids (pad, bos, eos, decoder start) come from the tokenizer folder
written by ``tuneforge tokenizer train``. The saved run is a plain Hugging Face folder like any other.

Sizes: ``tiny`` 2 layers x 128 wide x 2 heads (tests), ``small`` 4 x 256 x 4 (a CPU-sized GPT, the
default), ``base`` 12 x 768 x 12 (BERT-base / GPT-2 small shape). ``model.layers``, ``model.hidden``,
``model.heads`` override single values; the MLP is ``model.intermediate`` or 4 x hidden (Vaswani et al.
2017; BERT and GPT-2 use the same ratio). Position tables cover ``max(512, data.max_length)`` tokens.

`load_or_build` is what objectives call: it loads ``model_path`` with an ``AutoModelFor*`` class, or
builds from scratch when the run says so, returning a `Built` either way. `model_source` gives the pipeline
the folder and config to validate against before any weights exist.

This module is imported by the config schema, so it must not import torch or transformers at top level.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ConfigError

if TYPE_CHECKING:
    from tuneforge.config.schema import ModelConfig, RunConfig
    from tuneforge.objectives.base import Built

__all__ = [
    "ARCHITECTURES",
    "SIZES",
    "WARM_STARTS",
    "build_scratch",
    "check_scratch_config",
    "describe",
    "load_or_build",
    "model_source",
    "scratch_config",
    "scratch_dims",
]

ARCHITECTURES = ("bert", "roberta", "gpt2", "llama", "t5")
SIZES: dict[str, tuple[int, int, int]] = {"tiny": (2, 128, 2), "small": (4, 256, 4), "base": (12, 768, 12)}
_SCRATCH_ONLY = ("architecture", "tokenizer", "size", "layers", "hidden", "heads", "intermediate")
#: architectures made from pretrained weights (``model.init=pretrained``): bert2bert is an encoder-decoder
#: whose encoder and decoder both start from the encoder ``model.name`` (Rothe et al. 2020)
WARM_STARTS = ("bert2bert",)


def scratch_dims(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """(layers, hidden, heads, intermediate) of a scratch model: the size preset, then explicit values."""
    layers, hidden, heads = SIZES[cfg.size or "small"]
    layers, hidden, heads = cfg.layers or layers, cfg.hidden or hidden, cfg.heads or heads
    return layers, hidden, heads, cfg.intermediate or 4 * hidden


def check_scratch_config(cfg: ModelConfig) -> None:
    """Cross-field checks of the ``model`` block (raises ValueError, reported by the config loader)."""
    if cfg.init != "scratch":
        stray = [k for k in _SCRATCH_ONLY if getattr(cfg, k) is not None
                 and not (k == "architecture" and cfg.architecture in WARM_STARTS)]
        if stray:
            raise ValueError(f"model.{stray[0]} only applies with model.init=scratch")
        return
    if cfg.architecture is None:
        raise ValueError(f"model.init=scratch needs model.architecture; allowed: {', '.join(ARCHITECTURES)}")
    if cfg.architecture in WARM_STARTS:
        raise ValueError(f"model.architecture={cfg.architecture} warm-starts from a pretrained encoder (model.name) "
                         "and needs model.init=pretrained; a seq2seq model from scratch is model.architecture=t5")
    if cfg.tokenizer is None:
        raise ValueError("model.init=scratch needs model.tokenizer (a folder from `tuneforge tokenizer train`)")
    _, hidden, heads, _ = scratch_dims(cfg)
    if hidden % heads:
        raise ValueError(f"model.hidden={hidden} must be divisible by model.heads={heads}")


def _tokenizer(run: RunConfig) -> Any:
    from transformers import AutoTokenizer

    folder = Path(run.model.tokenizer).expanduser()
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ConfigError(f"{folder} is not a tokenizer folder (no tokenizer.json); train one with "
                          "`tuneforge tokenizer train --out DIR`", key="model.tokenizer")
    return AutoTokenizer.from_pretrained(folder)


def scratch_config(run: RunConfig, tokenizer: Any | None = None) -> Any:
    """The transformers config of the scratch model of ``run`` (no weights are created)."""
    import transformers as tf

    tok = tokenizer if tokenizer is not None else _tokenizer(run)
    arch = run.model.architecture
    layers, hidden, heads, inter = scratch_dims(run.model)
    positions = max(512, run.data.max_length)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    common = {"vocab_size": len(tok), "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "intermediate_size": inter}
    if arch in ("bert", "roberta") and tok.pad_token_id is None:
        raise ConfigError(f"the tokenizer in {run.model.tokenizer} has no pad token, which {arch} needs",
                          key="model.tokenizer")
    if arch == "bert":
        return tf.BertConfig(**common, max_position_embeddings=positions, pad_token_id=tok.pad_token_id)
    if arch == "roberta":  # positions are offset by padding_idx + 1
        return tf.RobertaConfig(**common, max_position_embeddings=positions + 2, type_vocab_size=1, **ids)
    if arch == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=heads, max_position_embeddings=positions,
                              tie_word_embeddings=True, **ids)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=hidden, n_layer=layers,
                             n_head=heads, n_inner=inter, **ids)
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {run.model.tokenizer} needs pad and eos tokens for t5 "
                          "(train it with --family t5)", key="model.tokenizer")
    return tf.T5Config(vocab_size=len(tok), d_model=hidden, d_kv=hidden // heads, d_ff=inter, num_layers=layers,
                       num_decoder_layers=layers, num_heads=heads, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)


def build_scratch(run: RunConfig, head_cls: Any) -> tuple[Any, Any]:
    """(randomly initialised ``head_cls`` model, tokenizer) for ``run.model`` with init=scratch.

    ``head_cls`` is an ``AutoModelFor*`` class (or a concrete model class); an architecture the head
    cannot take (e.g. gpt2 with a masked-LM head) is a `ConfigError` naming ``model.architecture``.
    """
    import torch

    tok = _tokenizer(run)
    config = scratch_config(run, tok)
    config._attn_implementation = run.model.attn_implementation
    try:
        model = head_cls.from_config(config, dtype=torch.float32) if hasattr(head_cls, "from_config") \
            else head_cls(config)
    except ValueError as e:
        head = getattr(head_cls, "__name__", str(head_cls))
        raise ConfigError(f"'{run.model.architecture}' cannot be built as {head} ({e})",
                          key="model.architecture") from None
    return model, tok


def model_source(run: RunConfig) -> tuple[Path, Any]:
    """(folder, transformers config) the run starts from: the model folder, or the scratch tokenizer folder."""
    from transformers import AutoConfig

    from tuneforge.models.registry import resolve_model

    if run.model.init == "scratch":
        folder = Path(run.model.tokenizer).expanduser().resolve()
        return folder, scratch_config(run)
    path = resolve_model(run.model.name)
    if run.model.architecture in WARM_STARTS:  # an encoder-decoder made from the encoder, cached as a folder
        from tuneforge.models.warm_start import warm_start_folder

        path = warm_start_folder(run, path)
    return path, AutoConfig.from_pretrained(path)


def describe(run: RunConfig) -> str:
    """A short name for reports: the model name, or e.g. 'gpt2 from scratch (4x256, 4 heads)'."""
    if run.model.init != "scratch":
        return f"{run.model.name} ({run.model.architecture})" if run.model.architecture else run.model.name
    layers, hidden, heads, inter = scratch_dims(run.model)
    return f"{run.model.architecture} from scratch ({layers} layers x {hidden}, {heads} heads, mlp {inter})"


def load_or_build(run: RunConfig, auto_cls: Any, model_path: Path, *, architectures: tuple[str, ...] = ARCHITECTURES,
                  **kwargs: Any) -> Built:
    """The objective's model: ``auto_cls.from_pretrained(model_path)`` or a scratch build, as a `Built`.

    Pretrained: keys the checkpoint lacked (a fresh head) are reported in ``newly_initialized``. Scratch:
    ``model.architecture`` must be one of ``architectures`` (those that make sense for the objective);
    everything is new and trains, so nothing is listed.
    """
    import torch
    from transformers import AutoTokenizer

    from tuneforge.objectives.base import Built

    if run.model.init == "scratch":
        if run.model.architecture not in architectures:
            raise ConfigError(f"task '{run.task.name}' cannot train a '{run.model.architecture}' model from scratch; "
                              f"allowed: {', '.join(architectures)}", key="model.architecture")
        model, tok = build_scratch(run, auto_cls)
        return Built(model, tok, [])
    tok = AutoTokenizer.from_pretrained(model_path)
    model, info = auto_cls.from_pretrained(model_path, attn_implementation=run.model.attn_implementation,
                                           output_loading_info=True, dtype=torch.float32, **kwargs)
    return Built(model, tok, sorted(info.get("missing_keys", [])))
