"""Typed run configuration, one pydantic model per concern.

A recipe is YAML that serialises `RunConfig`. Every block forbids unknown keys, so a typo fails at
validation time with the key's dotted path. The `method` and `task` blocks are open registries: the
block's ``name`` picks a config class registered by the method or objective module (see
``tuneforge.methods`` and ``tuneforge.objectives``), so adding a method adds its own options without
touching this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

__all__ = [
    "DataConfig",
    "ExtensionConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "StrictModel",
    "TaskConfig",
    "TextPair",
    "TrainConfig",
    "register_extension_config",
    "register_method_config",
    "register_task_config",
    "task_block",
]


class StrictModel(BaseModel):
    """Base of every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- registries of named blocks
_METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}
_TASK_CONFIGS: dict[str, type[TaskConfig]] = {}
_EXTENSION_CONFIGS: dict[str, type[ExtensionConfig]] = {}


class MethodConfig(StrictModel):
    """Options of a fine-tuning method; subclasses add method-specific fields.

    The class variables declare what the method is, so objectives refuse combinations by capability
    (never by a method's name) at config validation, before any model loads.
    """

    name: str = "full"
    #: learning rate used when ``train.lr`` is not set (methods differ by an order of magnitude).
    default_lr: ClassVar[float] = 5e-5
    #: the method adds virtual tokens / past key-values shared by a whole row (prefix, prompt, P-tuning v2)
    virtual_tokens: ClassVar[bool] = False
    #: only a separate task head trains (frozen backbone): objectives without such a head refuse it
    head_only: ClassVar[bool] = False
    #: the method can train a randomly initialised model (model.init=scratch), i.e. it trains it whole
    from_scratch: ClassVar[bool] = False

    def check_model(self, n_layers: int) -> None:
        """Raise `ConfigError` when the method's options cannot fit a model with ``n_layers`` blocks."""

    def check_run(self, run: Any) -> None:
        """Cross-field checks against the whole run (raise `ValueError` naming the keys)."""

    def quantization_aware(self) -> Any:
        """The quantization-aware-training options the method trains under (a `methods.qat.config.QatOptions`:
        ``method: qat`` itself, LoRA's ``qat`` block), or None."""
        return None


class TaskConfig(StrictModel):
    """Options of a training objective; subclasses add objective-specific fields."""

    name: str = "classification"
    general_eval: Path | None = Field(None, description="held-out general file: forgetting report before/after")
    #: the task's data blocks live inside the task block (multi-task runs), not in the top-level ``data``
    own_data: ClassVar[bool] = False
    #: trains encoder-decoders from sources to targets: reads line-aligned ``{source, target}`` file pairs
    #: as splits (`TextPair`) and takes warm-started encoder-decoders (``model.architecture=bert2bert``)
    seq2seq: ClassVar[bool] = False

    def check_run(self, run: Any) -> None:
        """Cross-field checks against the whole run (raise `ValueError` naming the keys)."""


class ExtensionConfig(StrictModel):
    """Options of a run extension (``extensions: [{name: NAME, ...}]``); subclasses add their fields."""

    name: str
    #: a cure for forgetting, also listed as ``retain: {NAME: {...}}`` (``retain.l2sp.alpha=0.01``)
    retain: ClassVar[bool] = False

    def check_run(self, run: Any) -> None:
        """Cross-field checks against the whole run (raise `ValueError` naming the keys)."""


def register_method_config(name: str, cls: type[MethodConfig]) -> None:
    """Make ``method: {name: NAME, ...}`` validate with ``cls``."""
    _METHOD_CONFIGS[name] = cls


def register_task_config(name: str, cls: type[TaskConfig]) -> None:
    """Make ``task: {name: NAME, ...}`` validate with ``cls``."""
    _TASK_CONFIGS[name] = cls


def register_extension_config(name: str, cls: type[ExtensionConfig]) -> None:
    """Make ``extensions: [{name: NAME, ...}]`` validate with ``cls``."""
    _EXTENSION_CONFIGS[name] = cls


def _ensure_registries() -> None:
    # The leaf registries import their plugin packages on first use, which runs the one-line
    # registrations; config classes live in modules that do not import torch, so validating stays fast.
    from tuneforge.registry import EXTENSIONS, METHODS, OBJECTIVES

    for registry in (METHODS, OBJECTIVES, EXTENSIONS):
        registry.names()


def _named_block(value: Any, registry: dict[str, type[StrictModel]], what: str) -> Any:
    if isinstance(value, StrictModel):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f"expected a {what} name or a mapping with 'name', got {value!r}")
    _ensure_registries()
    name = value.get("name", {"method": "full", "task": "classification"}.get(what))
    if name not in registry:
        allowed = ", ".join(sorted(registry))
        raise ValueError(f"unknown {what} '{name}'; allowed: {allowed}")
    return registry[name].model_validate(value)


def task_block(value: Any) -> TaskConfig:
    """A ``task`` block (a name or a mapping with ``name``) validated by its objective's config class; for
    configs that nest tasks (multi-task runs)."""
    return _named_block(value, _TASK_CONFIGS, "task")


# --------------------------------------------------------------------------- blocks
class ModelConfig(StrictModel):
    """Which model to start from and how to load it."""

    name: str = Field("minilm-l6", description="registry short name (see `tuneforge models`), a local HF folder, or a "
                      "Hugging Face Hub id org/name (local HF cache offline; downloaded with HF_HUB_OFFLINE=0)")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel")
    # Pretraining from scratch (see `tuneforge.models.scratch`); `name` is ignored when init=scratch.
    init: Literal["pretrained", "scratch"] = Field("pretrained", description="load weights, or build a random model")
    architecture: Literal["bert", "roberta", "gpt2", "llama", "t5", "bert2bert"] | None = Field(
        None, description="scratch model type; bert2bert: an encoder-decoder warm-started from the encoder `name`")
    tokenizer: Path | None = Field(None, description="scratch: tokenizer folder (`tuneforge tokenizer train`)")
    size: Literal["tiny", "small", "base"] | None = Field(None, description="scratch preset (default small)")
    layers: int | None = Field(None, ge=1, description="scratch: transformer blocks (overrides size)")
    hidden: int | None = Field(None, ge=8, description="scratch: hidden width (overrides size)")
    heads: int | None = Field(None, ge=1, description="scratch: attention heads (overrides size)")
    intermediate: int | None = Field(None, ge=8, description="scratch: MLP width (default 4 x hidden)")

    @model_validator(mode="after")
    def _scratch_checks(self) -> ModelConfig:
        from tuneforge.models.scratch import check_scratch_config

        check_scratch_config(self)
        return self


class TextPair(StrictModel):
    """Two line-aligned text files (one example a line, gzip read transparently): ``task: seq2seq`` sources
    and targets, e.g. ``data.train: {source: train.de.gz, target: train.en.gz}``."""

    source: Path = Field(description="source text file, one example a line")
    target: Path = Field(description="target text file, line-aligned with source")


class DataConfig(StrictModel):
    """Input files, their layout and how text is tokenized."""

    train: Path | TextPair | None = Field(None, description="training file (csv, tsv, json, jsonl, parquet, txt); "
                                          "seq2seq: also {source: FILE, target: FILE}")
    validation: Path | TextPair | None = Field(None, description="validation file; carved from train when absent")
    test: Path | TextPair | None = Field(None, description="optional test file evaluated at the end")
    format: Literal["csv", "tsv", "json", "jsonl", "parquet", "txt"] | None = Field(
        None, description="file format; by extension when absent"
    )
    header: bool = Field(True, description="csv/tsv: first row holds column names")
    quoting: bool = Field(True, description="csv/tsv: honour quote characters (off = csv.QUOTE_NONE)")
    delimiter: str | None = Field(None, description="csv/tsv field separator override")
    extra_fields: Literal["error", "drop"] = Field(
        "error", description="csv/tsv rows with more fields than the header: an error, or drop the extra ones")
    encoding: str = Field("utf-8", description="text encoding of the input files")
    text_column: str | int = Field("text", description="column name or 0-based index")
    text_pair_column: str | int | None = Field(None, description="second text for sentence-pair tasks")
    label_column: str | int = Field("label", description="column name or 0-based index")
    validation_split: float = Field(0.1, gt=0.0, lt=0.9, description="share of train held out when no validation")
    max_length: int = Field(128, ge=8, le=8192, description="truncate inputs to this many tokens")
    max_train_samples: int | None = Field(None, ge=1, description="use a seeded random sample of N training rows")
    max_eval_samples: int | None = Field(None, ge=1, description="use a seeded random sample of N validation rows")
    streaming: bool = Field(False, description="pretraining: tokenize txt/jsonl on the fly (train may be a glob/folder)")

    @field_validator("text_column", "text_pair_column", "label_column")
    @classmethod
    def _nonnegative_index(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, int) and v < 0:
            raise ValueError("a column index is 0-based and must be >= 0")
        return v

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError as e:
            raise ValueError(f"unknown text encoding '{v}' (e.g. utf-8, latin-1, cp1252)") from e
        return v


class TrainConfig(StrictModel):
    """The optimisation loop: budget, optimiser, schedule, precision, evaluation and checkpoints."""

    epochs: float = Field(3.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(32, ge=1, description="examples per micro-batch")
    eval_batch_size: int | None = Field(None, ge=1, description="examples per eval batch (default 2x batch_size)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float | None = Field(None, gt=0, description="peak learning rate; the method's default when absent")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay (not applied to biases and norms)")
    optimizer: Literal["adamw", "adafactor"] = Field(
        "adamw", description="adamw (fused AdamW) | adafactor (Shazeer & Stern 2018, torch.optim.Adafactor: updates "
        "relative to each weight's RMS, no first moment; what T5 was trained with, and what a T5 from scratch "
        "needs: its attention has no 1/sqrt(d) scaling, so AdamW's absolute steps blow its logits up; lr ~1e-2)")
    fast_dropout: bool = Field(
        True, description="on CPU, draw dropout masks from 16-bit integer randoms (3x cheaper than torch's "
        "bernoulli_; same dropout, keep probability rounded to 2^-16, a different random stream), also for the "
        "attention-probability dropout of sdpa attention; false: torch's")
    packed_attention: bool = Field(
        True, description="on CPU, rows packed by documents (task.packing=documents): attention runs once per "
        "document (causal) instead of over the whole row with a block-diagonal mask, whose masked-out pairs torch's "
        "CPU kernel still computes (same outputs to float rounding; SmolLM2 SFT rows: 47 -> 29 ms per layer); "
        "false: the masked call")
    first_token_last_layer: bool = Field(
        True, description="task=classification on a BERT-family encoder (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM): the "
        "last layer computes only the first token, the one the head reads (same logits and gradients; ~14% fewer "
        "matmuls on MiniLM-L6); false: every position")
    tune_allocator: bool = Field(
        True, description="on CPU (Linux, glibc), keep freed large buffers in the heap for the next step instead "
        "of returning them to the kernel and faulting them in again (mallopt; 1.3x on tiny-GPT-2 pretraining, 1-6% "
        "on MiniLM fine-tuning; process-wide, results unchanged); false: the C library's defaults")
    sparse_embeddings: bool = Field(
        False, description="update only the word-embedding rows a step looked up (lazy AdamW on a sparse gradient: "
        "faster when the vocabulary is large and batches are short; unused rows skip that step's weight decay "
        "and momentum, so results differ slightly from dense AdamW). Single process, adamw, untied embeddings")
    embedding_row_grads: bool = Field(
        True, description="on CPU, full fine-tuning of a model with an untied word embedding (encoders: "
        "classification, NER, QA), one process, adamw, no extensions: the embedding's gradient holds the rows a "
        "step looked up and is scattered into a kept dense gradient, so the whole [vocab, hidden] matrix is not "
        "zeroed, normed and scaled every step (MiniLM: ~10% of a step); AdamW still updates every row. Results "
        "equal the dense path to float rounding (the clip norm's summation order). false: torch's dense gradient")
    compile: Literal["off", "blocks", "model"] = Field(
        "off", description="torch.compile: blocks = each repeated transformer block (regional: one compiled graph for "
        "all), model = the whole model; the first steps pay the compile (26 s for a 2-layer GPT-2 on 2 CPU cores, "
        "again for each new input shape). Measured, not a default (benchmarks/README.md). Single process or DDP")
    chunked_cross_entropy: bool = Field(
        True, description="language models (clm, sft, dpo, simpo, kto) with a frozen output layer (LoRA and other "
        "PEFT methods), and every language model's evaluation and reference log-probs: compute the output layer and "
        "the next-token loss together over chunks of rows, never holding the [tokens, vocab] logits (same loss up "
        "to bf16 rounding; faster and far less memory with large vocabularies); false: project, then cross-entropy")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of steps spent warming up")
    warmup_steps: int | None = Field(None, ge=0, description="warmup steps; overrides warmup_ratio")
    max_grad_norm: float | None = Field(1.0, ge=0, description="clip gradients to this norm (0/None: off)")
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise LR decay factor per layer from the head down"
    )
    device: str = Field("auto", description="auto (the best present: cuda, then mps, then cpu) | cpu | cuda | "
                        "cuda:N | mps")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast where it pays (CUDA with bf16; a CPU where a bf16 matmul measures "
        ">= 1.25x fp32's, e.g. AMX), fp16 with a grad scaler on older GPUs, else fp32; weights stay fp32")
    distributed: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="under torchrun/accelerate (WORLD_SIZE > 1): auto = ddp; batch_size is per rank, the "
        "global batch is batch_size x ranks x grad_accum; fsdp = FSDP2 fully_shard with sharded (DCP) checkpoints; "
        "deepspeed = DeepSpeed ZeRO stage 1/2 (extra: tuneforge[deepspeed]), configured by train.deepspeed")
    deepspeed: str | dict[str, Any] | None = Field(
        None, description="with distributed=deepspeed: a DeepSpeed config (JSON file path or mapping) passed through "
        "to deepspeed.initialize, e.g. {zero_optimization: {stage: 1}}; default ZeRO stage 2. Batch sizes, "
        "accumulation, clipping, optimizer, schedule and precision come from train.* (docs/distributed.md)")
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    seed: int = 42
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: each epoch)")
    eval_on_start: bool = Field(False, description="also evaluate the untrained model, logged as step 0 (a baseline; "
                                "never chosen as the best checkpoint)")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (default: at each eval)")
    save_total_limit: int = Field(2, ge=1, description="keep this many recent checkpoints (plus the best)")
    metric: str | None = Field(None, description="eval metric for best checkpoint / early stopping")
    early_stopping_patience: int | None = Field(None, ge=1, description="evals without improvement before stopping")
    load_best_at_end: bool = Field(True, description="final model = best checkpoint by `metric`")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="on NaN/inf loss: skip the batch (stop after max_nonfinite in a row) or stop at once"
    )
    max_nonfinite: int = Field(10, ge=1, description="consecutive skipped steps before stopping")
    log_steps: int = Field(10, ge=1, description="log train loss/lr every N steps")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers the metrics are mirrored to: "
        "tensorboard, mlflow, wandb (optional extras), or none; e.g. [tensorboard, mlflow]")
    tensorboard: bool | None = Field(None, description="older switch, kept as an alias: false drops tensorboard "
                                     "from report_to, true adds it; unset: report_to decides")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_known(cls, v: Any) -> Any:
        from tuneforge.track.trackers import tracker_names

        names = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v
        if not isinstance(names, list):
            return names  # pydantic reports the type
        allowed = [*tracker_names(), "none"]
        for name in names:
            if name not in allowed:
                raise ValueError(f"unknown tracker '{name}'; allowed: {', '.join(allowed)}")
        if "none" in names and len(names) > 1:
            raise ValueError("'none' cannot be combined with other trackers")
        if len(set(names)) < len(names):
            raise ValueError("a tracker is listed twice")
        return names

    @property
    def trackers(self) -> list[str]:
        """The trackers this run logs to: ``report_to`` without ``none``, after the ``tensorboard`` alias."""
        names = [n for n in self.report_to if n != "none"]
        if self.tensorboard is False:
            names = [n for n in names if n != "tensorboard"]
        elif self.tensorboard and "tensorboard" not in names:
            names.insert(0, "tensorboard")
        return names

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, v: Any) -> Any:
        """YAML reads ``off`` as false and ``on`` as true: false/null is ``off``, true is ``blocks``."""
        return {False: "off", None: "off", True: "blocks"}.get(v, v) if isinstance(v, bool) or v is None else v

    @model_validator(mode="after")
    def _compile_fits(self) -> TrainConfig:
        if self.compile != "off" and self.distributed in ("fsdp", "deepspeed"):
            raise ValueError(f"train.compile={self.compile} runs single-process or under DDP; with "
                             f"train.distributed={self.distributed} set train.compile=off")
        return self

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"'{v}' is not a device; allowed: auto, cpu, cuda, cuda:N, mps")
        return v


class RunConfig(StrictModel):
    """A whole run: model × method × task × data, plus the loop settings and where outputs go."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    task: SerializeAsAny[TaskConfig] = Field("classification", validate_default=True)  # type: ignore[assignment]
    method: SerializeAsAny[MethodConfig] = Field("full", validate_default=True)  # type: ignore[assignment]
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    extensions: list[SerializeAsAny[ExtensionConfig]] = Field(
        default_factory=list, description="run extensions with their options, e.g. [{name: samples, count: 3}]")
    retain: dict[str, SerializeAsAny[ExtensionConfig]] = Field(
        default_factory=dict, description="cures for forgetting, combinable: {l2sp: {alpha, beta}, ewc: {lambda_, "
        "fisher_data}, distill: {teacher, temperature, weight}} (extensions listed by name)")
    output_dir: Path | None = Field(None, description="run directory (default runs/<task>-<time>)")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("method", mode="before")
    @classmethod
    def _method_block(cls, v: Any) -> Any:
        return _named_block(v, _METHOD_CONFIGS, "method")

    @field_validator("task", mode="before")
    @classmethod
    def _task_block(cls, v: Any) -> Any:
        return _named_block(v, _TASK_CONFIGS, "task")

    @field_validator("extensions", mode="before")
    @classmethod
    def _extension_blocks(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list):
            v = [v]
        blocks = [_named_block(b, _EXTENSION_CONFIGS, "extension") for b in v]
        names = [b.name for b in blocks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"extension {', '.join(twice)} is listed more than once")
        return blocks

    @field_validator("retain", mode="before")
    @classmethod
    def _retain_blocks(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("retain is a mapping of cure -> options, e.g. {l2sp: {alpha: 0.01}}")
        from pydantic import ValidationError

        out = {}
        for name, options in v.items():
            try:
                block = _named_block({**(options or {}), "name": name} if not isinstance(options, StrictModel)
                                     else options, _EXTENSION_CONFIGS, "extension")
            except ValidationError as e:  # name the nested key: retain.ewc.fisher_data
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"retain.{name}.{where} {first['msg']}") from None
            if not type(block).retain:
                allowed = ", ".join(sorted(n for n, c in _EXTENSION_CONFIGS.items() if c.retain))
                raise ValueError(f"'{name}' is not a cure for forgetting; retain takes: {allowed}")
            out[name] = block
        return out

    def extension(self, name: str) -> ExtensionConfig | None:
        """The options block of extension ``name`` when the recipe lists it (under ``extensions`` or ``retain``)."""
        return next((b for b in [*self.extensions, *self.retain.values()] if b.name == name), None)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        d, t = self.data, self.train
        if d.text_pair_column is not None and d.text_pair_column == d.text_column:
            raise ValueError("data.text_pair_column must differ from data.text_column")
        if t.early_stopping_patience is not None and t.eval_steps is None and t.epochs < 2 and t.max_steps is None:
            raise ValueError(
                "train.early_stopping_patience needs several evaluations: set train.eval_steps or train.epochs >= 2"
            )
        if self.model.init == "scratch" and not self.method.from_scratch:
            allowed = ", ".join(sorted(n for n, c in _METHOD_CONFIGS.items() if c.from_scratch))
            raise ValueError(f"method.name '{self.method.name}' adapts pretrained weights; a model.init=scratch model "
                             f"trains whole (allowed: {allowed})")
        paired = [k for k in ("train", "validation", "test") if isinstance(getattr(d, k), TextPair)]
        seq2seq = ", ".join(sorted(n for n, c in _TASK_CONFIGS.items() if c.seq2seq))
        if paired and not type(self.task).seq2seq:
            raise ValueError(f"data.{paired[0]} {{source, target}} file pairs are read by task {seq2seq} only; "
                             f"task '{self.task.name}' takes one file")
        if self.model.init == "pretrained" and self.model.architecture and not type(self.task).seq2seq:
            raise ValueError(f"model.architecture '{self.model.architecture}' builds an encoder-decoder, which task "
                             f"'{self.task.name}' does not train (task {seq2seq} does)")
        twice = sorted({b.name for b in self.extensions} & set(self.retain))
        if twice:
            raise ValueError(f"retain.{twice[0]} is also listed under extensions; list it once")
        self.method.check_run(self)
        self.task.check_run(self)
        for block in [*self.extensions, *self.retain.values()]:
            block.check_run(self)
        return self

    @property
    def lr(self) -> float:
        """The effective peak learning rate (explicit or the method's default)."""
        return self.train.lr if self.train.lr is not None else type(self.method).default_lr
