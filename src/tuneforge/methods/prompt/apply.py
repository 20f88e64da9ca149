"""Prompt-tuning (Lester et al. 2021) runtime: peft ``PromptTuningConfig`` on the model's task type.

Decoder classifiers (Llama, GPT-2) read the logits at the last non-pad *input id*; with a soft prompt peft
passes ``inputs_embeds`` instead, so transformers falls back to the last position, a pad token in
right-padded batches. Two forward hooks (registered from outside, after wrapping and again after loading)
make the classifier read the last position with ``attention_mask == 1`` instead, which is correct for
right and left padding. Soft prompts are not weights, so merge is unsupported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods._peft import (
    load_adapter,
    peft_activate,
    peft_attach,
    peft_reference,
    read_peft_config,
    save_adapter,
    wrap_prompt_learning,
)
from tuneforge.methods.base import MethodContext, MethodRuntime

__all__ = ["MERGE_UNSUPPORTED", "apply", "attach", "load", "save"]

MERGE_UNSUPPORTED = "a soft prompt is an extra input, not a change of weights"

_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    import peft

    m = run.method
    path = str(getattr(model.config, "name_or_path", "") or "")

    def make(tt: str, heads: list[str] | None) -> Any:
        text = {"prompt_tuning_init_text": m.init_text, "tokenizer_name_or_path": path} if m.init == "text" else {}
        return peft.PromptTuningConfig(task_type=tt, num_virtual_tokens=m.num_virtual_tokens,
                                       prompt_tuning_init=_INIT[m.init], modules_to_save=heads, **text)

    wrapped = wrap_prompt_learning(model, make, ctx, "prompt")
    _pool_last_attended(wrapped)
    return wrapped


def save(model: nn.Module, folder: Path) -> None:
    save_adapter(model, folder)


def load(base_model: nn.Module, folder: Path, method_cfg: Any) -> nn.Module:
    from peft import PeftConfig

    # the prompt is read from the folder: skip the text/vocab init (it would need the base tokenizer path)
    config = PeftConfig.from_pretrained(folder)
    config.prompt_tuning_init = "RANDOM"
    model = load_adapter(base_model, folder, config=config)
    _pool_last_attended(model)
    return model


def attach(model: nn.Module, folder: Path, name: str) -> nn.Module:
    """`peft_attach` with the prompt read from the folder (no text/vocab init) and, on the first attach, the
    pooling hooks of `load`."""
    from peft import PeftModel

    first = not isinstance(model, PeftModel)
    config = read_peft_config(folder)
    config.prompt_tuning_init = "RANDOM"
    model = peft_attach(model, folder, name, config=config)
    if first:
        _pool_last_attended(model)
    return model


def _pool_last_attended(model: nn.Module) -> None:
    """For decoder sequence classifiers: pool at the last attended position (see module docstring)."""
    hf = model.get_base_model()
    score = getattr(hf, "score", None)
    if score is None or getattr(model.peft_config[model.active_adapter], "task_type", None) != "SEQ_CLS":
        return
    seen: dict[str, torch.Tensor | None] = {}

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # only the soft-prompt path (embeddings without ids) loses the pad positions
        seen["mask"] = kwargs.get("attention_mask") if kwargs.get("input_ids") is None else None

    def repool(module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        mask = seen.get("mask")
        if mask is None or logits.dim() != 3 or logits.shape[1] != mask.shape[1]:
            return logits
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask.ne(0)).argmax(-1)  # [B] last attended position
        out = logits.clone()
        out[:, -1] = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return out

    hf.register_forward_pre_hook(remember, with_kwargs=True)
    score.register_forward_hook(repool)


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge_unsupported=MERGE_UNSUPPORTED,
                       reference=peft_reference, attach=attach, activate=peft_activate)
