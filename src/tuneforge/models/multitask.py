"""One backbone, several task heads: the model of a multi-task run.

Each task keeps its own Hugging Face task model (``BertForSequenceClassification``,
``BertForTokenClassification``, ...) so its forward, loss inputs and outputs are exactly those of a single-task
run; all of them run over one shared base model (``model.<base_model_prefix>``, e.g. ``bert``). The base is
registered once, on this module; in each task model it is a plain attribute (not a submodule), so
``parameters()``, ``state_dict()`` and the methods see every weight once:

    bert.*                      the shared backbone (the pooler too when a task uses one)
    heads.<task>.<head>.*       each task's head (classifier, qa_outputs, ...)

Methods that change modules in place (LoRA, IA3, adapters, BitFit, QLoRA's 4-bit layers, full, frozen) thus
change the backbone of every task at once; methods that add virtual tokens to one model's forward (prefix,
prompt, P-tuning v2) do not apply, and the multi-task config refuses them.

The layout (task names, their transformers classes, label maps) travels in the saved ``config.json`` under
``tuneforge_multitask``, so `MultiTaskModel.from_pretrained` rebuilds the model from a saved folder (full
weights) or from the base model folder (a method's saved weights are loaded on top, see `methods.saved`).
`task_model` gives one task as a plain transformers model (the ``tuneforge merge --task`` export).

Hard parameter sharing with task-specific heads is the setting of Caruana (1997) and MT-DNN (Liu et al. 2019).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LAYOUT_KEY", "MultiTaskModel"]

LAYOUT_KEY = "tuneforge_multitask"
_WEIGHTS = "model.safetensors"
_HEAD_KEYS = ("id2label", "label2id", "problem_type", "pad_token_id")  # what a task's config adds to the base's


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class MultiTaskModel(nn.Module):
    """Task models sharing one base model (see module docstring).

    Args:
        task_models: task name -> its transformers task model, all of one architecture (their own base
            models are dropped except one, which all then share).
        backbone_task: whose base model is kept; default the largest (e.g. the one with a pooler).
    """

    def __init__(self, task_models: dict[str, nn.Module], backbone_task: str | None = None):
        super().__init__()
        if not task_models:
            raise ValueError("a multi-task model needs at least one task")
        prefixes = {m.base_model_prefix for m in task_models.values()}
        if len(prefixes) != 1:
            raise ValueError(f"the task models do not share one architecture (base prefixes {sorted(prefixes)})")
        self.base_model_prefix = prefix = prefixes.pop()
        self.backbone_task = backbone_task or max(task_models, key=lambda n: _size(_base(task_models[n])))
        backbone = _base(task_models[self.backbone_task])
        setattr(self, prefix, backbone)
        self.heads = nn.ModuleDict()
        for name, model in task_models.items():
            del model._modules[prefix]
            object.__setattr__(model, prefix, backbone)  # an attribute, not a submodule: registered once, above
            self.heads[name] = model
        self.config = copy.deepcopy(task_models[self.backbone_task].config)
        for key in _HEAD_KEYS[:3]:
            if hasattr(self.config, key):
                delattr(self.config, key)
        setattr(self.config, LAYOUT_KEY, {"backbone_task": self.backbone_task, "tasks": [
            {"name": n, "model_class": type(m).__name__,
             "config": {k: getattr(m.config, k) for k in _HEAD_KEYS if getattr(m.config, k, None) is not None}}
            for n, m in task_models.items()]})

    @property
    def base_model(self) -> nn.Module:
        """The shared backbone (the transformers convention: ``getattr(model, model.base_model_prefix)``)."""
        return getattr(self, self.base_model_prefix)

    @property
    def task_names(self) -> list[str]:
        return list(self.heads)

    def forward(self, *args: Any, task: str | None = None, **kwargs: Any) -> Any:
        """The output of task ``task``'s model (the first task when None: e.g. a merge probe)."""
        return self.heads[task or self.task_names[0]](*args, **kwargs)

    def head_module_of(self, parameter: str) -> str:
        """The module that owns head parameter ``parameter`` (``heads.<task>.<child>``): what peft trains
        whole (``modules_to_save``), one per task, never the container of all heads."""
        parts = parameter.split(".")
        return ".".join(parts[:3]) if parts[0] == "heads" and len(parts) > 3 else parameter.rsplit(".", 1)[0]

    def task_model(self, name: str) -> nn.Module:
        """Task ``name`` as a plain transformers model (its own copy of the backbone as a real submodule)."""
        head = self.heads[name]
        out = type(head)(copy.deepcopy(head.config))
        state = {f"{self.base_model_prefix}.{k}": v for k, v in _base(self).state_dict().items()}
        state.update(head.state_dict())
        missing, _ = out.load_state_dict(state, strict=False)  # extra: a pooler this head does not use
        if missing:
            raise RuntimeError(f"task '{name}': the shared weights lack {missing[:5]}")
        return out.to(next(self.parameters()).device)

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """``config.json`` (with the layout) and every weight once in ``model.safetensors``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / _WEIGHTS), metadata={"format": "pt", "tuneforge": "multitask"})

    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: Any = None, dtype: torch.dtype | None = None,
                        **kwargs: Any) -> MultiTaskModel:
        """Rebuild from a folder `save_pretrained` wrote, or from the base model folder ``path`` with the
        layout in ``config`` (a method's saved folder: its weights go on top, see `methods.saved`)."""
        import transformers
        from transformers import AutoConfig

        path = Path(path)
        config = config if config is not None else AutoConfig.from_pretrained(path)
        layout = getattr(config, LAYOUT_KEY, None)
        if not layout:
            raise ValueError(f"{path}: the config has no multi-task layout ('{LAYOUT_KEY}')")
        saved = _is_multitask_weights(path / _WEIGHTS)
        models: dict[str, nn.Module] = {}
        for task in layout["tasks"]:
            task_cls = getattr(transformers, task["model_class"])
            task_cfg = copy.deepcopy(config)
            delattr(task_cfg, LAYOUT_KEY)
            for key, value in task["config"].items():
                setattr(task_cfg, key, {int(k): v for k, v in value.items()} if key == "id2label" else value)
            if task["name"] == layout["backbone_task"] and not saved:
                models[task["name"]] = task_cls.from_pretrained(path, config=task_cfg, dtype=dtype, **kwargs)
            else:
                models[task["name"]] = task_cls(task_cfg).to(dtype or torch.float32)
        model = cls(models, backbone_task=layout["backbone_task"])
        if saved:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path / _WEIGHTS)), strict=True)
        return model


def _is_multitask_weights(file: Path) -> bool:
    if not file.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return (f.metadata() or {}).get("tuneforge") == "multitask"


def read_layout(folder: Path) -> dict[str, Any] | None:
    """The multi-task layout of a saved model folder, or None for a single-task folder."""
    p = Path(folder) / "config.json"
    return json.loads(p.read_text(encoding="utf-8")).get(LAYOUT_KEY) if p.is_file() else None
