"""Encoder-decoders warm-started from a pretrained encoder (``model.architecture=bert2bert``).

Rothe, Narayan and Severyn (2020), "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks":
both halves of a transformers ``EncoderDecoderModel`` start from the same BERT-style checkpoint; the
decoder gets causal self-attention, new cross-attention layers (randomly initialised) and the masked-LM
head as its output layer. ``task.tie_encoder_decoder=true`` shares the encoder's and decoder's weights
(their BERTShare). Special tokens follow the paper and the transformers BERT2BERT recipe: the decoder
starts from ``[CLS]``, ends with ``[SEP]`` and pads with ``[PAD]``.

Why a folder: the warm-started model is written once to ``$TUNEFORGE_CACHE/warm-start/<key>`` (atomic
rename) and the run loads it like any seq2seq checkpoint. So the run's base model is a real folder, which
adapter methods (LoRA, IA3 ...) record as their base and reload from, and the same seed gives the same
cross-attention initialisation in every process. The key hashes the encoder's weights file, the options
and the seed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError

__all__ = ["warm_start_folder"]

_VERSION = "1"


def _fingerprint(encoder: Path, tie: bool, seed: int) -> str:
    h = hashlib.sha256(f"{_VERSION}|{tie}|{seed}|".encode())
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        f = encoder / name
        if f.is_file():
            st = f.stat()
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}|{f.resolve()}".encode())
    return h.hexdigest()[:16]


def _build(encoder: Path, out: Path, tie: bool, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, EncoderDecoderModel

    config = AutoConfig.from_pretrained(encoder)
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in ("bert", "roberta", "electra",
                                                                               "xlm-roberta", "distilbert"):
        raise ConfigError(f"model.architecture=bert2bert warm-starts from a BERT-style encoder; {encoder} is a "
                          f"'{config.model_type}' model", key="model.architecture")
    tok = AutoTokenizer.from_pretrained(encoder)
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if start is None or end is None or tok.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {encoder} lacks [CLS]/[SEP]/[PAD] (or bos/eos/pad), which bert2bert "
                          "uses to start, end and pad targets", key="model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(encoder), str(encoder),
                                                                    tie_encoder_decoder=tie)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = start, end, tok.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    model.save_pretrained(out)
    tok.save_pretrained(out)


def warm_start_folder(run: Any, encoder: Path) -> Path:
    """The cached warm-started encoder-decoder folder of ``run`` (built on first use)."""
    from tuneforge.models.tiny import tiny_cache_root

    tie = bool(getattr(run.task, "tie_encoder_decoder", False))
    final = tiny_cache_root() / "warm-start" / f"bert2bert-{_fingerprint(encoder, tie, run.train.seed)}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        _build(encoder, tmp, tie, run.train.seed)
        try:
            os.rename(tmp, final)  # atomic; another process may have won the race
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
