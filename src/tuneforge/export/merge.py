"""``tuneforge merge RUN_DIR OUT_DIR``: fold a run's method into plain transformers weights.

The method's declared ``merge(model)`` (`MethodRuntime`, see `tuneforge.methods.saved`) turns the trained model into the
base architecture with the update folded into its weights (LoRA/DoRA/IA3 via peft, QLoRA after
dequantising). OUT_DIR is a plain Hugging Face folder that transformers loads without tuneforge or peft
(``AutoModelFor....from_pretrained(OUT_DIR)``, ``AutoTokenizer.from_pretrained(OUT_DIR)``), with tuneforge's
own two files beside the HF ones so that ``tuneforge predict/eval/serve OUT_DIR`` work as on the run:

    OUT_DIR/config.json, model.safetensors, tokenizer files, labels.json    save_pretrained + side files
    OUT_DIR/config.yaml        the run's recipe (task and data layout for predict/eval)
    OUT_DIR/merge.json         what was merged, from where, and the merged-vs-unmerged probe difference

Readers find the model of either layout with `tuneforge.track.rundir.model_folder` (folders merged before
this layout, with the HF files in ``OUT_DIR/model/``, still read).

Methods that cannot be merged (prefix, prompt: extra inputs, not weights) say why in ``merge_unsupported``;
merge then stops with that reason (exit 2) unless ``export=True``, which writes a self-contained folder
instead: the method weights, a copy of the base model under ``base/`` and a manifest pointing there,
loadable by tuneforge (the manifest holds an absolute path, so move such a folder by exporting again).
Runs whose model is already a plain folder (full, frozen, partial) are copied as they are.

``--task NAME`` on a multi-task run writes that one task as a single-task run: the method folded in, the
task's head on its own copy of the backbone, its label set and tokenizer, and the single-task recipe, so
OUT_DIR is evaluated and predicted with like any classification/NER/QA run (and loads in transformers).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.inference import load_run
from tuneforge.methods import get_method
from tuneforge.methods._peft import task_type
from tuneforge.methods.saved import METHOD_FILE, load_trained, read_manifest
from tuneforge.objectives import get_spec
from tuneforge.track import atomic_directory, atomic_write_json
from tuneforge.track.rundir import model_folder

__all__ = ["MergeResult", "MergeUnsupportedError", "merge_run"]

# Files of a saved method folder that are not carried into a merged folder (weights are re-saved).
_METHOD_FILES = {METHOD_FILE, "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json",
                 "README.md"}  # README.md: peft's adapter model card
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_BASE_FILES = ("config.json", "generation_config.json")


class MergeUnsupportedError(TuneforgeError):
    """The run's method cannot be folded into plain weights (exit code 2)."""


@dataclass
class MergeResult:
    """Where the output went and what kind it is: ``merged``, ``copied`` (already plain), ``exported`` or
    ``task`` (one task of a multi-task run)."""

    out_dir: Path
    kind: str
    method: str
    max_abs_diff: float | None = None


def merge_run(run_dir: Path, out_dir: Path, *, export: bool = False, overwrite: bool = False,
              task: str | None = None) -> MergeResult:
    """Merge (or, with ``export``, package) the model of ``run_dir`` into ``out_dir``; see module docstring.
    ``task``: one task of a multi-task run, written as a plain single-task run (`_merge_task`)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = load_run(run_dir, [], task)
    model_dir = model_folder(run_dir)
    if out_dir.resolve() == run_dir.resolve() or out_dir.resolve().is_relative_to(model_dir.resolve()):
        raise ConfigError(f"the output {out_dir} must be outside the run directory {run_dir}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty; use --overwrite to replace it")
    if task is not None:
        return _merge_task(run, run_dir, out_dir, task)
    manifest = read_manifest(model_dir)
    if manifest is None:
        with atomic_directory(out_dir) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            _finish(tmp, run_dir, {"kind": "copied", "method": run.method.name})
        return MergeResult(out_dir, "copied", run.method.name)

    method = manifest["method"]
    merge = get_method(method).runtime().merge
    if merge is None:
        reason = get_method(method).runtime().merge_unsupported or "the method defines no merge"
        if not export:
            raise MergeUnsupportedError(f"method '{method}' cannot be merged into plain weights: {reason}; "
                                        f"`tuneforge merge {run_dir} {out_dir} --export` writes a self-contained "
                                        "folder that tuneforge loads instead")
        return _export(run_dir, out_dir, manifest)

    device = Runtime.for_run(run.train).device  # fp32 always: merged weights are saved as they are computed
    model = load_trained(get_spec(run.task.name).model_cls(), model_dir, dtype=torch.float32).eval().to(device)
    probe = {k: v.to(device) for k, v in _probe_inputs(model).items()}
    with torch.no_grad():
        before = model(**probe).logits.float()
        merged = merge(model).eval()
        diff = float((merged(**probe).logits.float() - before).abs().max())
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp)
        _copy_side_files(model_dir, tmp)
        _finish(tmp, run_dir, {"kind": "merged", "method": method, "options": manifest["options"],
                               "base_model": manifest["base_model"], "probe_max_abs_logit_diff": diff})
    return MergeResult(out_dir, "merged", method, diff)


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A fixed small batch (ids 10..17, the second row padded) to compare merged and unmerged outputs."""
    cfg = model.config
    ids = torch.arange(10, 18).reshape(2, 4)
    mask = torch.ones_like(ids)
    if getattr(cfg, "pad_token_id", None) is not None:
        ids[1, 3], mask[1, 3] = cfg.pad_token_id, 0
    out = {"input_ids": ids, "attention_mask": mask}
    if getattr(cfg, "is_encoder_decoder", False):
        if getattr(cfg, "eos_token_id", None) is not None:  # T5 classifiers pool at the (single) end token
            ids[0, 3], ids[1, 2] = cfg.eos_token_id, cfg.eos_token_id
        if task_type(model) == "SEQ_2_SEQ_LM":  # classifiers derive decoder inputs themselves
            out["decoder_input_ids"] = torch.full((2, 1), cfg.decoder_start_token_id or 0)
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, labels.json and the like (a multi-task run's ``tasks/``): all but weights and method files."""
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, dst / f.name)
        elif f.is_file() and f.name not in _METHOD_FILES and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def _merge_task(run: Any, run_dir: Path, out_dir: Path, task: str) -> MergeResult:
    """One task of a multi-task run as a single-task run folder whose ``model/`` is plain transformers: the
    method folded in (when it has weights to fold), the task's head on its own copy of the backbone."""
    from tuneforge.config import to_yaml
    from tuneforge.objectives import get_objective
    from tuneforge.objectives.configs.multitask import sub_run

    model_dir = model_folder(run_dir)
    manifest = read_manifest(model_dir)
    method = manifest["method"] if manifest else run.method.name
    merge = get_method(method).runtime().merge if manifest else (lambda m: m)
    if merge is None:
        reason = get_method(method).runtime().merge_unsupported or "the method defines no merge"
        raise MergeUnsupportedError(f"method '{method}' cannot be merged into plain weights: {reason}")
    built = get_objective(run).from_saved(model_dir)
    device = Runtime.for_run(run.train).device
    model = built.model.to(device)
    probe = {k: v.to(device) for k, v in _probe_inputs(model).items()}
    with torch.no_grad():
        before = model(task=task, **probe).logits.float()
        single = merge(model).eval().task_model(task).eval()
        diff = float((single(**probe).logits.float() - before).abs().max())
    with atomic_directory(out_dir) as tmp:
        single.save_pretrained(tmp)
        for f in (model_dir / "tasks" / task).iterdir():
            shutil.copy2(f, tmp / f.name)
        (tmp / "config.yaml").write_text(to_yaml(sub_run(run, task)), encoding="utf-8")
        atomic_write_json(tmp / "merge.json", {"source_run": str(run_dir.resolve()), "kind": "task", "task": task,
                                               "method": method, "probe_max_abs_logit_diff": diff})
    return MergeResult(out_dir, "task", method, diff)


def _finish(tmp: Path, run_dir: Path, info: dict[str, Any]) -> None:
    shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
    atomic_write_json(tmp / "merge.json", {"source_run": str(run_dir.resolve()), **info})


def _export(run_dir: Path, out_dir: Path, manifest: dict[str, Any]) -> MergeResult:
    """Self-contained folder: method weights + a copy of the base model + a manifest pointing at that copy."""
    base = Path(manifest["base_model"])
    if not (base / "config.json").is_file():
        raise ConfigError(f"the base model {base} of this run is no longer there; cannot export")
    final_base = out_dir.resolve() / "base"
    with atomic_directory(out_dir) as tmp:
        shutil.copytree(model_folder(run_dir), tmp, dirs_exist_ok=True)
        (tmp / "base").mkdir()
        for f in base.iterdir():
            if f.is_file() and (f.name in _BASE_FILES or f.name.endswith((*_WEIGHT_SUFFIXES, ".index.json"))):
                shutil.copy2(f, tmp / "base" / f.name)
        atomic_write_json(tmp / METHOD_FILE, {**manifest, "base_model": str(final_base)})
        _finish(tmp, run_dir, {"kind": "exported", "method": manifest["method"], "base_model": str(final_base),
                               "original_base_model": str(base)})
    return MergeResult(out_dir, "exported", manifest["method"])
