"""Tiny random-weight models, built locally, so tests and examples never need a download.

Each tiny model is a standard Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) that ``AutoModel*`` / ``AutoTokenizer`` load with ``HF_HUB_OFFLINE=1``. Sizes are
2 layers, hidden 32, 4 heads (llama: 2 key/value heads), intermediate 64, a ~1k-token vocabulary.

Why build instead of ship: the weights are random anyway, so a recipe is smaller than binaries in
the repo. The tokenizer is trained (in well under a second) on ``assets/tiny_corpus.txt``.

Guarantees:

* deterministic: with the same library versions, every machine gets byte-identical files. Weights
  come from a local ``torch.Generator`` seeded with 0 (the global RNG state is left untouched), and
  only deterministic `tokenizers` trainers are used (plain BPE; the WordPiece and Unigram trainers
  vary run to run, so BERT's WordPiece vocabulary is derived from a BPE run, and T5 uses BPE);
* built once: cached under ``<root>/tiny/<TINY_VERSION>/<arch>`` where ``<root>`` is the
  ``cache_dir`` argument, else ``$TUNEFORGE_CACHE``, else ``$XDG_CACHE_HOME/tuneforge`` or
  ``~/.cache/tuneforge``; bump ``TINY_VERSION`` whenever the recipe changes;
* process-safe: each build happens in a private temp folder renamed into place atomically; if
  another process won the race, its (identical) folder is reused.

Saved heads: bert/roberta ``*ForMaskedLM``, llama/gpt2 ``*ForCausalLM``, t5
``T5ForConditionalGeneration``, so every head class (sequence classification, ...) can load its base.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "TINY_FAMILIES",
    "TINY_VERSION",
    "build_tiny_model",
    "tiny_cache_root",
    "tiny_model_path",
    "tiny_tokenizer",
]

TINY_FAMILIES: tuple[str, ...] = ("bert", "roberta", "llama", "gpt2", "t5")
TINY_VERSION = "v1"  # part of the cache path: bump when anything below changes the built files

CORPUS_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny_corpus.txt"
VOCAB_SIZE = 1024  # trainer target (byte-level BPE: 256 bytes + specials + merges)
MAX_LENGTH = 512
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 32, 2, 4, 2, 64
INIT_STD = 0.02
SEED = 0
N_SENTINELS = 20
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _check_arch(arch: str) -> str:
    if arch not in TINY_FAMILIES:
        raise ConfigError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_FAMILIES)}")
    return arch


def tiny_cache_root(cache_dir: str | Path | None = None) -> Path:
    """The tuneforge cache root: ``cache_dir``, else $TUNEFORGE_CACHE, else the user cache folder."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    if env := os.environ.get("TUNEFORGE_CACHE"):
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return ((Path(xdg) if xdg else Path.home() / ".cache") / "tuneforge").absolute()


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED_FILES)


def tiny_model_path(arch: str, cache_dir: str | Path | None = None) -> Path:
    """The local HF folder of tiny model ``arch``, building it on first use (see module docstring)."""
    final = tiny_cache_root(cache_dir) / "tiny" / TINY_VERSION / _check_arch(arch)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}.building-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build_tiny_model(arch, tmp)
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final, ignore_errors=True)  # a leftover from an interrupted manual copy
        try:
            os.rename(tmp, final)  # atomic; fails if another process already put a folder there
        except OSError:
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- tokenizers


def _corpus_lines() -> list[str]:
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _wordpiece_vocab(lines: list[str], specials: list[str]) -> dict[str, int]:
    """A BERT-style WordPiece vocabulary, derived deterministically from a plain BPE run.

    The `tokenizers` WordPiece trainer (and BPE with ``continuing_subword_prefix``) picks different
    pieces from run to run, while plain BPE is stable. So: train BPE on the normalized, BERT-split
    words with a word-start marker (▁), then map ``▁piece`` -> ``piece`` and ``piece`` -> ``##piece``;
    every character gets both forms so any word made of seen characters encodes without [UNK].
    WordPiece encoding is greedy longest-match, so only the set of pieces matters, not merge ranks.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers import trainers as tr

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.BertPreTokenizer(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    bpe.train_from_iterator(
        lines, tr.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False)
    )
    vocab: dict[str, int] = {}
    for piece, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):
        if piece in specials:
            forms = [piece]
        elif piece.startswith("▁"):
            forms = [piece[1:]] if len(piece) > 1 else []
        else:
            forms = [piece, "##" + piece] if len(piece) == 1 else ["##" + piece]
        for form in forms:
            vocab.setdefault(form, len(vocab))
    return vocab


def _train_raw_tokenizer(arch: str) -> tuple[Tokenizer, dict[str, Any]]:
    """Train the `tokenizers` object for ``arch``; returns it and the special-token kwargs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers as tr

    lines = _corpus_lines()
    if arch == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = _wordpiece_vocab(lines, specials)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        kwargs: dict[str, Any] = {
            "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "mask_token": "[MASK]", "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
            "clean_up_tokenization_spaces": True,
        }  # fmt: skip
        return tok, kwargs

    if arch == "t5":
        # Metaspace BPE rather than Unigram: the Unigram trainer's scores vary run to run.
        specials = ["<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        tok.train_from_iterator(
            lines, tr.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False)
        )
        sentinels = [f"<extra_id_{i}>" for i in range(N_SENTINELS)]
        tok.add_special_tokens([AddedToken(s, special=True) for s in sentinels])
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", tok.token_to_id("</s>"))]
        )
        kwargs = {
            "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
            "extra_special_tokens": sentinels, "clean_up_tokenization_spaces": False,
        }  # fmt: skip
        return tok, kwargs

    # Byte-level BPE (roberta, llama, gpt2): every string encodes without <unk> and decodes back exactly.
    specials = {
        "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        "llama": ["<s>", "</s>", "<pad>"],
        "gpt2": ["<|endoftext|>"],
    }[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tr.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    base = {"model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False}
    if arch == "roberta":
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), add_prefix_space=False
        )
        kwargs = {
            "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
            "unk_token": "<unk>", "pad_token": "<pad>",
            "mask_token": AddedToken("<mask>", lstrip=True, rstrip=False, special=True),
        }  # fmt: skip
    elif arch == "llama":
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[bos]
                ),
            ]
        )
        kwargs = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    else:  # gpt2: like the original, no special tokens added; pad = eos
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        eot = "<|endoftext|>"
        kwargs = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    return tok, {**base, **kwargs}


def tiny_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A freshly trained fast tokenizer for ``arch`` (deterministic; < 1 s; nothing is cached)."""
    from transformers import PreTrainedTokenizerFast

    tok, kwargs = _train_raw_tokenizer(_check_arch(arch))
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LENGTH, **kwargs)


# --------------------------------------------------------------------------- models


def _model_and_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    """Instantiate the (randomly initialised) head model for ``arch`` sized for ``tokenizer``."""
    import transformers as tf

    vocab = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    common = {"vocab_size": vocab, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS}
    common |= {"num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE}
    if arch == "bert":
        cfg = tf.BertConfig(**common, max_position_embeddings=MAX_LENGTH, pad_token_id=tokenizer.pad_token_id)
        return tf.BertForMaskedLM(cfg)
    if arch == "roberta":
        # RoBERTa offsets positions by padding_idx + 1, hence 512 + 2 rows for 512 tokens.
        cfg = tf.RobertaConfig(**common, max_position_embeddings=MAX_LENGTH + 2, type_vocab_size=1, **ids)
        return tf.RobertaForMaskedLM(cfg)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            **common, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_LENGTH,
            tie_word_embeddings=False, **ids,
        )  # fmt: skip
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_positions=MAX_LENGTH, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
            n_inner=INTERMEDIATE, **ids,
        )  # fmt: skip
        return tf.GPT2LMHeadModel(cfg)
    cfg = tf.T5Config(
        vocab_size=vocab, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=HEADS, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(cfg)


def _reinit_deterministically(model: torch.nn.Module) -> None:
    """Overwrite every parameter from a local generator: norms 1, biases 0, the rest N(0, INIT_STD).

    Independent of the global RNG and of transformers' own init recipes, so the files stay
    identical across machines and library versions that keep the same parameter layout.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(SEED)
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # tied weights (e.g. gpt2/bert/t5 embeddings and lm head)
                    continue
                seen.add(id(param))
                if is_norm and name == "weight":
                    param.fill_(1.0)
                elif name == "bias":
                    param.zero_()
                else:
                    values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * INIT_STD
                    param.copy_(values.to(param.dtype))


def build_tiny_model(arch: str, folder: str | Path) -> Path:
    """Write tiny model ``arch`` (tokenizer, config, weights) into ``folder``, uncached."""
    import torch

    folder = Path(folder)
    tokenizer = tiny_tokenizer(arch)
    with torch.random.fork_rng(devices=[]):  # model construction draws from the global RNG
        torch.manual_seed(SEED)
        model = _model_and_config(arch, tokenizer)
    _reinit_deterministically(model)
    model.eval()
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise for a 300 KB file
    try:
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return folder
