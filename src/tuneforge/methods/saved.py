"""Saving and loading a trained model whatever the method, so every verb loads runs the same way.

A method's `MethodRuntime` (``methods/<name>/apply.py``: ``METHOD``) may declare, besides ``apply``:

* ``save(model, folder)``: write what the method trained (e.g. adapter weights only). Absent: the whole
  model is written with ``save_pretrained`` (full, frozen, partial).
* ``load(base_model, folder, method_cfg) -> model``: the inverse of ``save`` on a freshly loaded base.
* ``merge(model) -> model``: fold the method into plain transformers weights (LoRA, IA3, BitFit...).
  Absent, ``merge_unsupported`` says why.

When ``save`` exists, the folder also gets the model's ``config.json`` (so the head shape is known) and
``tuneforge_method.json`` naming the method, its options and the base model folder; `load_trained`
reads that manifest to rebuild the model. A folder without a manifest is a plain Hugging Face folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.track.atomic import atomic_write_json

__all__ = ["METHOD_FILE", "WEIGHT_SUFFIXES", "load_trained", "read_manifest", "save_trained", "weights_bytes"]

METHOD_FILE = "tuneforge_method.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def save_trained(model: nn.Module, folder: Path, method_cfg: Any, base_model: Path) -> None:
    """Write ``model`` into ``folder`` the way its method wants (whole model or method weights + manifest)."""
    from tuneforge.methods import get_method

    runtime = get_method(method_cfg.name).runtime()
    if runtime.save is None:
        model.save_pretrained(folder)
        return
    runtime.save(model, folder)
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    config.save_pretrained(folder)
    atomic_write_json(folder / METHOD_FILE, {
        "method": method_cfg.name, "options": method_cfg.model_dump(mode="json"),
        "base_model": "." if runtime.self_contained else str(base_model),  # "." : the folder holds the whole model
    })


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files in a saved folder: what a user ships for this method."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in WEIGHT_SUFFIXES)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The method manifest of a saved folder, or None for a plain Hugging Face folder."""
    p = Path(folder) / METHOD_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def load_trained(model_cls: Any, folder: Path, **kwargs: Any) -> nn.Module:
    """Load a saved model folder with ``model_cls`` (e.g. AutoModelForSequenceClassification)."""
    from transformers import AutoConfig

    from tuneforge.methods import get_method

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return model_cls.from_pretrained(folder, **kwargs)
    base_path = Path(manifest["base_model"])
    if not base_path.is_absolute():  # exports point at a copy inside themselves: keep them relocatable
        base_path = folder / base_path
    if not (base_path / "config.json").is_file():
        raise ConfigError(f"{folder} holds '{manifest['method']}' weights for the base model {base_path}, "
                          "which is no longer there; `tuneforge merge` or an exported folder is self-contained")
    spec = get_method(manifest["method"])
    base = model_cls.from_pretrained(base_path, config=AutoConfig.from_pretrained(folder), **kwargs)
    method_cfg = spec.config.model_validate(manifest["options"])
    return spec.runtime().load(base, folder, method_cfg)
