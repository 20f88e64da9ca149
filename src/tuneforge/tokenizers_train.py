"""Train a tokenizer for a model family from text files, with the Hugging Face `tokenizers` library.

``type`` picks the model and how text is split: ``bytelevel-bpe`` (GPT-2/RoBERTa: BPE over bytes, every
string encodes without unknown tokens and decodes back exactly), ``bpe`` (character BPE over
SentencePiece-style ``▁`` words, as Llama 1/2 but without byte fallback: unseen characters are unknown),
``wordpiece`` (BERT) and ``unigram`` (the SentencePiece unigram LM of Kudo 2018, as T5). ``family`` picks the special tokens and the post-processor that adds them:

* bert: ``[PAD] [UNK] [CLS] [SEP] [MASK]``; ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]``; lowercased;
* roberta: ``<s> <pad> </s> <unk> <mask>``; ``<s> A </s>`` and ``<s> A </s></s> B </s>``;
* gpt2: ``<|endoftext|>`` (bos = eos = unk) and ``<|pad|>``; nothing added (documents end with EOS when
  a causal-LM objective packs them);
* llama: ``<unk> <s> </s> <pad>``; ``<s> A``;
* t5: ``<pad> </s> <unk>`` then 100 sentinels ``<extra_id_0..99>`` at the top ids (``<extra_id_0>`` last, as
  T5's vocabulary); ``A </s>``. The trained vocabulary is ``vocab_size - 100`` so the total is ``vocab_size``.

The output folder is what ``AutoTokenizer.from_pretrained`` loads (``tokenizer.json`` +
``tokenizer_config.json``) plus ``tokenizer_train.json`` with the settings and the statistics. Statistics
are measured on a held-out sample, the last ``holdout`` share of documents of each file (not trained
on): unknown-token rate, tokens per whitespace word, characters per token, and the share of documents
that decode back to exactly the same text.

Determinism (tokenizers 0.23.3): the BPE trainers (``bytelevel-bpe``, ``bpe``) give identical files on
every run (tested). The WordPiece and Unigram trainers do not: ties between equally frequent pieces are
broken in a different order on each run, so the vocabulary differs in a few pieces and in id order
(measured on tinyshakespeare + wiki_demo at 8k: WordPiece differs in 2 of 8,000 pieces).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError, DataError

__all__ = ["FAMILIES", "TYPES", "TokenizerReport", "train_tokenizer"]

TYPES = ("bytelevel-bpe", "bpe", "wordpiece", "unigram")
FAMILIES = ("bert", "roberta", "gpt2", "llama", "t5")
DEFAULT_FAMILY = {"bytelevel-bpe": "gpt2", "bpe": "llama", "wordpiece": "bert", "unigram": "t5"}
N_SENTINELS = 100
_SPECIALS = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "gpt2": ["<|endoftext|>", "<|pad|>"],
    "llama": ["<unk>", "<s>", "</s>", "<pad>"],
    "t5": ["<pad>", "</s>", "<unk>"],
}
_UNK = {"bert": "[UNK]", "roberta": "<unk>", "gpt2": "<|endoftext|>", "llama": "<unk>", "t5": "<unk>"}
_ROLES = {
    "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
             "mask_token": "[MASK]"},
    "roberta": {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"},
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|pad|>"},
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
}


@dataclass
class TokenizerReport:
    """What was trained and how well it covers held-out text."""

    out: str
    type: str
    family: str
    vocab_size: int
    files: list[str]
    train_documents: int
    heldout_documents: int
    unk_rate: float  # unknown tokens / tokens on the held-out sample
    tokens_per_word: float  # tokens / whitespace-separated words
    chars_per_token: float
    exact_roundtrip: float  # share of held-out documents with decode(encode(text)) == text
    seconds: float

    def summary(self) -> str:
        return (f"trained {self.type} ({self.family}) with {self.vocab_size:,} tokens on {self.train_documents:,} "
                f"documents in {self.seconds:.1f} s -> {self.out}\n"
                f"held-out sample ({self.heldout_documents:,} documents): unknown-token rate "
                f"{100 * self.unk_rate:.3f}%, {self.tokens_per_word:.3f} tokens/word, "
                f"{self.chars_per_token:.2f} chars/token, exact round trip {100 * self.exact_roundtrip:.1f}%")


def _pipeline(kind: str, family: str, lowercase: bool) -> tuple[Any, Any]:
    """(untrained `Tokenizer`, trainer class and kwargs) for a type."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    unk = _UNK[family]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok, ("WordPieceTrainer", {"continuing_subword_prefix": "##"})
    if lowercase:
        tok_norm: Any = normalizers.Lowercase()
    else:
        tok_norm = None
    if kind == "bytelevel-bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = ("BpeTrainer", {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()})
    else:  # bpe / unigram over "▁"-marked words, as SentencePiece
        tok = Tokenizer(models.BPE(unk_token=unk) if kind == "bpe" else models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = ("BpeTrainer", {}) if kind == "bpe" else ("UnigramTrainer", {"unk_token": unk})
    if tok_norm is not None:
        tok.normalizer = tok_norm
    return tok, trainer


def _post_processor(tok: Any, kind: str, family: str) -> Any:
    from tokenizers import processors

    ids = {t: tok.token_to_id(t) for t in _SPECIALS[family]}
    templates = {
        "bert": ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ["[CLS]", "[SEP]"]),
        "roberta": ("<s> $A </s>", "<s> $A </s> </s> $B </s>", ["<s>", "</s>"]),
        "llama": ("<s> $A", "<s> $A <s> $B", ["<s>"]),
        "t5": ("$A </s>", "$A </s> $B </s>", ["</s>"]),
    }
    steps = [processors.ByteLevel(trim_offsets=True)] if kind == "bytelevel-bpe" else []
    if family in templates:
        single, pair, used = templates[family]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(t, ids[t]) for t in used]))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _documents(files: Sequence[Path], holdout: float) -> list[tuple[Path, str, int]]:
    """Per file: (path, format, number of training documents = all but the last ``holdout`` share)."""
    from tuneforge.data.readers import detect_format
    from tuneforge.data.streaming import TEXT_FORMATS, iter_documents

    plan = []
    for path in files:
        try:
            fmt = detect_format(path)
        except DataError:  # no known extension (parallel corpora: train.de, train.en.gz): one document a line
            fmt = "txt"
        if fmt not in TEXT_FORMATS:
            raise ConfigError(f"{path}: tokenizer training reads .txt or .jsonl ('text' field) files", key="--files")
        n = sum(1 for _ in iter_documents(path, fmt))
        n_train = n - int(n * holdout) if n > 1 else n
        plan.append((path, fmt, n_train))
    return plan


def _split(plan: list[tuple[Path, str, int]], heldout: bool) -> Iterator[str]:
    from tuneforge.data.streaming import iter_documents

    for path, fmt, n_train in plan:
        for i, (_, _, text) in enumerate(iter_documents(path, fmt)):
            if (i >= n_train) == heldout:
                yield text


def train_tokenizer(files: Sequence[str | Path], out: str | Path, *, type: str = "bytelevel-bpe",
                    vocab_size: int = 8000, family: str | None = None, min_frequency: int = 2,
                    holdout: float = 0.05, lowercase: bool | None = None, max_length: int = 512,
                    max_heldout: int = 20000) -> TokenizerReport:
    """Train, save to ``out`` (atomically) and measure on held-out documents; see the module docstring."""
    from tokenizers import AddedToken
    from tokenizers import trainers as tr
    from transformers import PreTrainedTokenizerFast

    from tuneforge.data.streaming import corpus_files
    from tuneforge.track.atomic import atomic_directory, atomic_write_json

    if type not in TYPES:
        raise ConfigError(f"unknown tokenizer type '{type}'; allowed: {', '.join(TYPES)}", key="--type")
    family = family or DEFAULT_FAMILY[type]
    if family not in FAMILIES:
        raise ConfigError(f"unknown family '{family}'; allowed: {', '.join(FAMILIES)}", key="--family")
    if not 0 <= holdout < 0.5:
        raise ConfigError("the held-out share must be in [0, 0.5)", key="--holdout")
    n_extra = N_SENTINELS if family == "t5" else 0
    floor = len(_SPECIALS[family]) + n_extra + (256 if type == "bytelevel-bpe" else 100)
    if vocab_size < floor:
        raise ConfigError(f"vocab size {vocab_size} is too small for {type}/{family}; at least {floor}", key="--vocab-size")
    paths = [p for f in files for p in corpus_files(f, "--files")]
    lowercase = family == "bert" if lowercase is None else lowercase
    start = time.perf_counter()

    tok, (trainer_name, trainer_kw) = _pipeline(type, family, lowercase)
    trainer = getattr(tr, trainer_name)(vocab_size=vocab_size - n_extra, special_tokens=_SPECIALS[family],
                                        show_progress=False, **trainer_kw,
                                        **({} if trainer_name == "UnigramTrainer" else {"min_frequency": min_frequency}))
    plan = _documents(paths, holdout)
    n_train = sum(p[2] for p in plan)
    tok.train_from_iterator(_split(plan, heldout=False), trainer, length=n_train)
    extra: list[str] = []
    if family == "t5":  # reversed, so that <extra_id_0> gets the highest id as in T5's vocabulary
        extra = [f"<extra_id_{k}>" for k in range(N_SENTINELS)]
        tok.add_special_tokens([AddedToken(s, special=True) for s in reversed(extra)])
    tok.post_processor = _post_processor(tok, type, family)
    roles: dict[str, Any] = dict(_ROLES[family])
    if family == "roberta":
        roles["mask_token"] = AddedToken("<mask>", lstrip=True, rstrip=False, special=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, clean_up_tokenization_spaces=False,
                                   **({"extra_special_tokens": extra} if extra else {}), **roles)
    seconds = time.perf_counter() - start
    heldout = [t for _, t in zip(range(max_heldout), _split(plan, heldout=True), strict=False)]
    stats = _coverage(fast, heldout or list(_split(plan, heldout=False))[-100:])
    report = TokenizerReport(str(out), type, family, len(fast), [str(p) for p in paths], n_train, len(heldout),
                             seconds=seconds, **stats)
    with atomic_directory(Path(out)) as tmp:
        fast.save_pretrained(tmp)
        atomic_write_json(tmp / "tokenizer_train.json", {**asdict(report), "min_frequency": min_frequency,
                                                         "lowercase": lowercase, "holdout": holdout})
    return report


def _coverage(tok: Any, texts: list[str]) -> dict[str, float]:
    """Unknown-token rate, tokens per word, characters per token and exact round-trip share on ``texts``."""
    enc = tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    n_tokens = sum(len(x) for x in enc)
    unk = tok.unk_token_id
    n_unk = sum(x.count(unk) for x in enc) if unk is not None else 0  # no special tokens were added
    n_words = sum(len(t.split()) for t in texts)
    exact = sum(tok.decode(x) == t for x, t in zip(enc, texts, strict=True))
    return {"unk_rate": n_unk / max(n_tokens, 1), "tokens_per_word": n_tokens / max(n_words, 1),
            "chars_per_token": sum(map(len, texts)) / max(n_tokens, 1), "exact_roundtrip": exact / max(len(texts), 1)}


def load_report(folder: str | Path) -> dict[str, Any]:
    """The ``tokenizer_train.json`` written next to a trained tokenizer."""
    return json.loads((Path(folder) / "tokenizer_train.json").read_text(encoding="utf-8"))
