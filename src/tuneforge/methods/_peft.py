"""Plumbing shared by the methods that wrap Hugging Face `peft` (lora, qlora, ia3, prefix, ptuning_v2, prompt).

peft owns the layers (LoRA/DoRA/IA3 injection, prefix key/values, soft prompts), their save format and
merge; this module decides *where* they go on any HF model, from outside the model code:

* the task head (``ctx.head_names``: the classifier/score outside the base model plus weights the
  checkpoint did not provide, e.g. a fresh BERT pooler) is fully trained via peft ``modules_to_save``;
* target modules are resolved to exact module paths among the backbone's linear layers (``nn.Linear`` and
  GPT-2's ``Conv1D``), never inside the head, so short names such as ``dense`` cannot catch a pooler or a
  RoBERTa head; unknown names fail with the list of the model's linear module names;
* the peft task type follows the model class (``*ForSequenceClassification`` -> SEQ_CLS, ...), so later
  objectives get the right peft wrapper without touching the methods.

Saving writes a standard peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, head
weights included) that plain ``peft.PeftModel.from_pretrained(base, folder)`` loads.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.methods.base import MethodContext, Reference

# bitsandbytes (imported by peft when installed) warns at import that an optional GPU-kernel package is
# missing; its CPU fallback is what we use, so the warning is noise on every command.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# peft still calls transformers' deprecated ``is_gradient_checkpointing``; the warning is not actionable here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__all__ = [
    "head_modules",
    "linear_modules",
    "load_adapter",
    "merge_peft",
    "peft_activate",
    "peft_attach",
    "peft_reference",
    "read_peft_config",
    "resolve_targets",
    "save_adapter",
    "task_type",
    "wrap",
    "wrap_prompt_learning",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Model-class suffix -> peft TaskType name. Objectives added later extend this by their head class.
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("EncoderDecoderModel", "SEQ_2_SEQ_LM"),
)


def task_type(model: nn.Module) -> str | None:
    """The peft task type matching ``model``'s head class, or None (plain `PeftModel`)."""
    name = type(model).__name__
    for suffix, tt in _TASK_TYPES:
        if name.endswith(suffix):
            if tt == "SEQ_2_SEQ_LM" and not getattr(model.config, "is_encoder_decoder", False):
                continue
            return tt
    return None


def head_modules(model: nn.Module, head_names: Iterable[str]) -> list[str]:
    """Module paths to train whole (peft ``modules_to_save``) for the head parameters ``head_names``.

    Parameters outside the base model (``classifier.*``, ``score.*``) give their top-level module; weights
    inside it that the checkpoint lacked (``bert.pooler.dense.weight``) give their owning module.
    """
    prefix = getattr(model, "base_model_prefix", "")
    owner = getattr(model, "head_module_of", None)  # a model with several heads says which module owns one
    # no parameter under the base-model prefix (EncoderDecoderModel): heads are weights the checkpoint lacked
    inside = any(n.startswith(prefix + ".") for n, _ in model.named_parameters()) if prefix else False
    out: set[str] = set()
    for name in head_names:
        if owner is not None:
            out.add(owner(name))
        elif (prefix and name.startswith(prefix + ".")) or not inside:
            out.add(name.rsplit(".", 1)[0])
        else:
            out.add(name.split(".", 1)[0])
    # a module nested in another head module is covered by its ancestor
    return sorted(m for m in out if not any(m != o and m.startswith(o + ".") for o in out))


def _inside(name: str, roots: Iterable[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def linear_modules(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Linear layers (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes 4-bit) by path, outside ``exclude`` and
    other than the LM output layer (tied to the embeddings in many decoders; adapting it is not LoRA's job)."""
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[type, ...] = (nn.Linear, Conv1D)
    try:  # the 4-bit layers of qlora subclass nn.Linear already; listed for clarity when present
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit,)
    except ImportError:
        pass
    exclude = list(exclude)
    get_out = getattr(model, "get_output_embeddings", None)
    lm_out = get_out() if callable(get_out) else None
    return {n: m for n, m in model.named_modules()
            if isinstance(m, kinds) and n and m is not lm_out and not _inside(n, exclude)}


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def resolve_targets(
    model: nn.Module, wanted: list[str] | str | None, defaults: dict[str, list[str]], exclude: Iterable[str],
    key: str = "method.target_modules",
) -> list[str]:
    """Exact module paths for the requested targets: names or dotted suffixes (``!name`` removes matches),
    or "all-linear" (every linear layer outside ``exclude``).

    ``None`` takes ``defaults[model_type]``. Raises `ConfigError` at ``key`` listing the model's linear
    module names when a name matches nothing or the architecture has no default.
    """
    linear = linear_modules(model, exclude)
    short = sorted({n.rsplit(".", 1)[-1] for n in linear})
    model_type = getattr(model.config, "model_type", "?")
    if model_type == "encoder-decoder":  # bert2bert: both stacks are the encoder's architecture
        model_type = getattr(model.config.encoder, "model_type", model_type)
    if wanted is None:
        wanted = defaults.get(model_type)
        if wanted is None:
            raise ConfigError(f"no default target modules for architecture '{model_type}'; set {key} to some of: "
                              f"{', '.join(short)} (or all-linear)", key=key)
    if wanted == "all-linear":
        if not linear:
            raise ConfigError(f"the '{model_type}' model has no linear layers outside its head", key=key)
        return sorted(linear)
    keep = [w for w in wanted if not w.startswith("!")]
    drop = [w[1:] for w in wanted if w.startswith("!")]
    unknown = [w for w in keep + drop if not any(_matches(n, w) for n in linear)]
    if unknown:
        raise ConfigError(f"no linear module named {', '.join(repr(u) for u in unknown)} in this '{model_type}' "
                          f"model; its linear modules are: {', '.join(short)} (a dotted suffix such as "
                          "'output.dense' narrows a name; or all-linear)", key=key)
    found = sorted(n for n in linear if any(_matches(n, w) for w in keep) and not any(_matches(n, w) for w in drop))
    if not found:
        raise ConfigError(f"{', '.join(wanted)} selects no module", key=key)
    return found


def wrap(model: nn.Module, peft_config: Any, ctx: MethodContext) -> nn.Module:
    """``get_peft_model`` + the head names of the wrapped model written back into ``ctx`` (for LR groups)."""
    from peft import get_peft_model

    wrapped = get_peft_model(model, peft_config)
    ctx.head_names = {n for n, p in wrapped.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    return wrapped


def wrap_prompt_learning(model: nn.Module, make_config: Any, ctx: MethodContext, method: str) -> nn.Module:
    """Wrap with a prompt-learning peft config built by ``make_config(task_type, modules_to_save)``.

    Whether peft can feed prefixes or soft prompts through a model depends on the model's forward (cache
    format, ``inputs_embeds`` support), so one tiny forward pass checks it here and turns a failure into a
    `ConfigError` naming the architecture, before any training step.
    """
    tt = task_type(model)
    if tt is None:
        raise ConfigError(f"method '{method}' needs a model class peft has a prompt-learning wrapper for "
                          f"(sequence/token classification, QA, causal or seq2seq LM); got {type(model).__name__}",
                          key="method")
    pc = make_config(tt, head_modules(model, ctx.head_names) or None)
    try:
        wrapped = wrap(model, pc, ctx)
        _probe(wrapped, tt)
    except ConfigError:
        raise
    except Exception as e:  # peft/transformers raise assorted errors for unsupported architectures
        model_type = getattr(model.config, "model_type", "?")
        raise ConfigError(f"method '{method}' does not work with the '{model_type}' architecture "
                          f"({type(model).__name__}): {type(e).__name__}: {e}", key="method") from None
    return wrapped


def _probe(model: nn.Module, tt: str) -> None:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # the model may already sit on a GPU (a DPO policy, `wiring`)
    ids = torch.tensor([[1, 2, 3]], device=device)
    extra = {"decoder_input_ids": torch.zeros((1, 1), dtype=torch.long, device=device)} if tt == "SEQ_2_SEQ_LM" else {}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
    model.train(was_training)


def save_adapter(model: nn.Module, folder: Path) -> int:
    """Write the peft adapter folder (adapter weights + head weights); returns the weights' size in bytes
    (the pipeline reports the saved size of every method)."""
    model.save_pretrained(folder)
    return (Path(folder) / ADAPTER_WEIGHTS).stat().st_size


def load_adapter(base: nn.Module, folder: Path, **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained`` in inference mode (the inverse of `save_adapter`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder, **kwargs).eval()


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights; returns the plain transformers model (heads unwrapped)."""
    with torch.no_grad():
        return model.merge_and_unload()


# --------------------------------------------------------------------------- reference (DPO/KTO/PPO, distillation)
@contextmanager
def _disabled(model: nn.Module) -> Iterator[nn.Module]:
    """peft's ``disable_adapter`` plus, for prompt-learning methods, the head.

    For LoRA/IA3 ``disable_adapter`` turns off every tuner layer *and* every ``modules_to_save`` wrapper (the
    head computes with its original module). For prompt learning (prefix, ptuning_v2, prompt) peft 0.21 only
    swaps ``forward`` for the base model's, so (1) the ``modules_to_save`` wrappers stay on and the *trained*
    head would be used: they are switched to their original module here; (2) it also swaps
    ``prepare_inputs_for_generation`` unconditionally and fails with ``UnboundLocalError`` on models without
    one (every classifier): `_prompts_off` does the ``forward`` swap itself.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    before = [(w, w._disable_adapters) for w in wrappers]
    prompts = model.peft_config[model.active_adapter].is_prompt_learning
    try:
        with _prompts_off(model) if prompts else model.disable_adapter():
            for w in wrappers:  # the flag alone: requires_grad is left as it is
                w._disable_adapters = True
            yield model
    finally:
        for w, flag in before:
            w._disable_adapters = flag


@contextmanager
def _prompts_off(model: nn.Module) -> Iterator[nn.Module]:
    """A prompt-learning `PeftModel` calling its base model directly (no virtual tokens or prefixes)."""
    saved = {k: model.__dict__[k] for k in ("forward", "prepare_inputs_for_generation") if k in model.__dict__}
    was_disabled = model._adapters_disabled
    try:
        model.forward = model.base_model.forward
        if hasattr(model.base_model, "prepare_inputs_for_generation"):
            model.prepare_inputs_for_generation = model.base_model.prepare_inputs_for_generation
        model._adapters_disabled = True
        yield model
    finally:
        for k in ("forward", "prepare_inputs_for_generation"):
            model.__dict__.pop(k, None)
        model.__dict__.update(saved)
        model._adapters_disabled = was_disabled


def peft_reference(model: nn.Module) -> Reference:
    """The base inside ``model.disable_adapter()`` (head included, see `_disabled`): nothing is copied."""
    from tuneforge.methods._reference import hooks_reference

    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"peft_reference needs a peft model, got {type(model).__name__}")
    return hooks_reference(model, _disabled)


# --------------------------------------------------------------------------- several adapters on one base (server)
_BASE_ATTR = "_tuneforge_attach_base"  # on the transformers model: what base the attached adapters expect


def _base_kind(hf: nn.Module) -> str:
    kind = getattr(hf, _BASE_ATTR, None)
    if kind is not None:
        return kind
    return "a 4-bit (qlora) base" if getattr(hf, "is_loaded_in_4bit", False) else "the plain base"


def read_peft_config(folder: Path) -> Any:
    """The adapter folder's peft config, as its own class (``LoraConfig``, ``PromptTuningConfig``...)."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(str(folder))].from_pretrained(str(folder))


def peft_attach(model: nn.Module, folder: Path, name: str, *, config: Any = None, base: str = "the plain base",
                prepare: Any = None) -> nn.Module:
    """Load the saved adapter ``folder`` (a run's ``model/`` folder) onto ``model`` as adapter ``name``.

    A plain transformers model becomes a `PeftModel` (``prepare(model)`` first, e.g. qlora's quantisation;
    ``name`` is then the active adapter); on a `PeftModel` the adapter is added beside the others, inactive
    until `peft_activate`. Each adapter carries its own copy of the task head (peft ``modules_to_save``).
    ``config`` overrides the folder's peft config; ``base`` names what base the adapter was trained on, and
    adapters for different bases (plain vs 4-bit) or of different peft types are refused with a ValueError.
    The model is returned for serving: eval mode, no parameter requires grad.
    """
    from peft import PeftModel

    folder = Path(folder)
    cfg = config if config is not None else read_peft_config(folder)
    if not isinstance(model, PeftModel):
        if prepare is not None:
            prepare(model)
        setattr(model, _BASE_ATTR, base)
        model = PeftModel.from_pretrained(model, folder, adapter_name=name, config=cfg)
        return model.requires_grad_(False).eval()
    if name in model.peft_config:
        raise ValueError(f"an adapter named '{name}' is already attached (attached: {', '.join(model.peft_config)})")
    have = _base_kind(model.get_base_model())
    if have != base:
        raise ValueError(f"{folder} was trained on {base}; the adapters attached to this model sit on {have}")
    if cfg.peft_type != model.peft_type:
        raise ValueError(f"{folder} holds a {cfg.peft_type} adapter; this model's adapters are {model.peft_type} "
                         "(peft keeps one adapter type per model: load another base for it)")
    cfg.inference_mode = True
    model.add_adapter(name, cfg)  # our config (load_adapter would read the folder's); then the weights
    model.load_adapter(str(folder), adapter_name=name)
    # peft leaves prompt encoders trainable even in inference mode; a served model trains nothing
    return model.requires_grad_(False).eval()


def peft_activate(model: nn.Module, name: str) -> None:
    """Make the attached adapter ``name`` (and its head) the one the model computes with, in inference mode."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"no adapters are attached to this {type(model).__name__}")
    if name not in model.peft_config:
        raise ValueError(f"no adapter named '{name}' is attached (attached: {', '.join(model.peft_config)})")
    model.set_adapter(name, inference_mode=True)
