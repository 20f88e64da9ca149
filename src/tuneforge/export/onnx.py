"""``tuneforge export RUN OUT --format onnx [--int8] [--data FILE]``: a run as an ONNX model, checked.

The run's model is first made plain (the method folded in, as ``tuneforge merge`` does; a method that cannot
merge cannot be exported and says why), then exported with ``torch.onnx.export`` (the dynamo exporter, ONNX
opset 18) with dynamic batch and sequence axes. Inputs: ``input_ids``, ``attention_mask`` (and
``token_type_ids`` where the tokenizer uses them); outputs: what the task reads (``logits``; ``start_logits``
and ``end_logits`` for QA; ``last_hidden_state`` for sentence encoders, pooled by the reader). Decoders are
exported as a plain forward without past key values (each call scores the whole sequence; no KV cache).
Encoder-decoder models (seq2seq runs, e.g. T5) are exported as one graph of the full teacher-forced forward:
inputs ``input_ids``, ``attention_mask`` and ``decoder_input_ids`` (its own dynamic ``decoder_sequence`` axis),
output ``logits``; no separate encoder/decoder graphs and no cache, so greedy generation re-runs the encoder
at each step (fine for scoring and short outputs). ``--data`` is refused for them: their metrics (BLEU, ROUGE)
come from generation, which an onnxruntime session of this graph does not do (`tuneforge eval` scores the run).

The export is verified, not assumed: onnxruntime runs a probe batch of another shape than the one traced and
every output must equal PyTorch's within ``TOLERANCE`` (the max abs difference is printed and written).
``--int8`` adds ``model.int8.onnx``, dynamically quantised by onnxruntime (int8 weights of the MatMul/Gemm
layers, activations quantised at run time; CPU inference). ``export.json`` records sizes, latency of PyTorch,
ONNX and int8 ONNX on this CPU (median of repeats, batch 1 and 32) and, with ``--data FILE``, the run's own
metrics on that file computed with each (the objective's ``evaluate`` over an onnxruntime session).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.track.rundir import model_folder

__all__ = ["OPSET", "TOLERANCE", "ExportVerificationError", "OrtModel", "export_onnx"]

OPSET = 18
TOLERANCE = 1e-4
_OUTPUTS = ("logits", "start_logits", "end_logits", "last_hidden_state")


class ExportVerificationError(TuneforgeError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance (exit code 3)."""

    exit_code = 3


class _Plain(nn.Module):
    """Positional inputs in, the task's outputs as a tuple out (no cache): a traceable forward."""

    def __init__(self, model: nn.Module, inputs: list[str], outputs: list[str], decoder: bool):
        super().__init__()
        self.model, self.inputs, self.outputs, self.decoder = model, inputs, outputs, decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        kwargs = {k: given[k] for k in self.inputs}
        if self.decoder:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        return tuple(getattr(out, k) for k in self.outputs)


class _PlainSeq2Seq(nn.Module):
    """An encoder-decoder's full forward (teacher-forced, no cache) with positional inputs: ``logits`` out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         use_cache=False)
        return (out.logits,)


class OrtModel:
    """An onnxruntime session called like a transformers model (keyword tensors in, named outputs out), so an
    objective's ``evaluate`` runs on it unchanged."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.training = False

    def __call__(self, **kwargs: torch.Tensor) -> Any:
        from types import SimpleNamespace

        if "token_type_ids" in self.inputs and "token_type_ids" not in kwargs:  # single texts: segment 0
            kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])
        feed = {k: kwargs[k].cpu().numpy().astype(np.int64) for k in self.inputs}
        values = self.session.run(self.outputs, feed)
        return SimpleNamespace(**{k: torch.from_numpy(v) for k, v in zip(self.outputs, values, strict=True)})

    def eval(self) -> OrtModel:
        return self

    def train(self, mode: bool = True) -> OrtModel:
        return self


def _plain_model(run_dir: Path) -> tuple[Any, Any, nn.Module, Any]:
    """(run, objective spec, the model with its method folded in, tokenizer)."""
    from transformers import AutoTokenizer

    from tuneforge.export.merge import MergeUnsupportedError
    from tuneforge.inference import load_run
    from tuneforge.methods import get_method
    from tuneforge.methods.saved import load_trained, read_manifest
    from tuneforge.objectives import get_spec

    run = load_run(run_dir, [])
    spec = get_spec(run.task.name)
    if not (spec.task_head or spec.embeds or spec.generative or _encoder_decoder(spec)):
        raise ConfigError(f"'{run.task.name}' runs are not exported to ONNX; for a multi-task run export one task: "
                          f"`tuneforge merge {run_dir} OUT --task NAME`, then `tuneforge export OUT ...`", key="task")
    model_dir = model_folder(run_dir)
    manifest = read_manifest(model_dir)
    model = load_trained(spec.model_cls(), model_dir, dtype=torch.float32).eval()
    if manifest is not None:
        method = get_method(manifest["method"]).runtime()
        if method.merge is None:
            raise MergeUnsupportedError(f"method '{manifest['method']}' cannot be exported: "
                                        f"{method.merge_unsupported or 'it defines no merge'}")
        with torch.no_grad():
            model = method.merge(model).eval()
    return run, spec, model, AutoTokenizer.from_pretrained(model_dir)


def _encoder_decoder(spec: Any) -> bool:
    """The objective's saved model is an encoder-decoder (seq2seq, T5 span corruption)."""
    return "Seq2Seq" in spec.model_class or "ConditionalGeneration" in spec.model_class


def _probe(tokenizer: Any, inputs: list[str], batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """Random ids (the first row padded at the end); ``decoder_input_ids`` are shorter (``seq // 2 + 1``)."""
    g = torch.Generator().manual_seed(seed)
    low = max(5, len(tokenizer.all_special_ids) + 1)
    ids = torch.randint(low, min(tokenizer.vocab_size, 1000), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq - 3 :] = 0
    if tokenizer.pad_token_id is not None:
        ids[0, seq - 3 :] = tokenizer.pad_token_id
    decoder = torch.randint(low, min(tokenizer.vocab_size, 1000), (batch, seq // 2 + 1), generator=g)
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
               "decoder_input_ids": decoder}
    return [by_name[k] for k in inputs]


def _median_ms(fn: Any, repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def export_onnx(run_dir: Path, out_dir: Path, *, int8: bool = False, data: Path | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Export, verify, optionally quantise and score (see module docstring); returns ``export.json``'s content."""
    from tuneforge.track import atomic_directory, atomic_write_json

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty; use --overwrite to replace it")
    if data is not None and not Path(data).exists():
        raise ConfigError(f"file not found: {data}", key="--data")
    run, spec, model, tokenizer = _plain_model(run_dir)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq and data is not None:
        raise ConfigError(f"--data scores a run with the exported model; a '{run.task.name}' run's metrics come from "
                          "generation, which the exported forward (no cache) does not do: drop --data and use "
                          f"`tuneforge eval {run_dir} --data FILE`", key="--data")
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names
                                                else [])
    if seq2seq:
        inputs = ["input_ids", "attention_mask", "decoder_input_ids"]
    with torch.no_grad():
        sample = model(**dict(zip(inputs, _probe(tokenizer, inputs, 2, 9, 0), strict=True)),
                       **({"use_cache": False} if spec.generative or seq2seq else {}))
    outputs = [k for k in _OUTPUTS if getattr(sample, k, None) is not None]
    plain = (_PlainSeq2Seq(model) if seq2seq else _Plain(model, inputs, outputs, spec.generative)).eval()
    axes = {"batch": 0, "sequence": 1, **({"decoder_sequence": 1} if seq2seq else {})}
    info: dict[str, Any] = {"source_run": str(run_dir.resolve()), "opset": OPSET, "inputs": inputs, "outputs": outputs,
                            "dynamic_axes": axes, "tolerance": TOLERANCE,
                            "kv_cache": False if spec.generative or seq2seq else None}
    with atomic_directory(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2)
        shapes = {k: {0: batch, 1: seq} for k in inputs}
        if seq2seq:
            shapes["decoder_input_ids"] = {0: batch, 1: torch.export.Dim("decoder_sequence", min=2)}
        torch.onnx.export(plain, tuple(_probe(tokenizer, inputs, 2, 9, 0)), str(onnx_path), input_names=inputs,
                          output_names=outputs, opset_version=OPSET, dynamo=True, external_data=False,
                          dynamic_shapes=shapes)
        probe = _probe(tokenizer, inputs, 3, 17, 1)
        ort_model = OrtModel(onnx_path)
        got = ort_model(**dict(zip(inputs, probe, strict=True)))
        with torch.no_grad():
            want = plain(*probe)
        diff = max(float((getattr(got, k) - w).abs().max()) for k, w in zip(outputs, want, strict=True))
        info["max_abs_diff"] = diff
        if not diff <= TOLERANCE:
            raise ExportVerificationError(f"onnxruntime differs from PyTorch by {diff:.3g} (> {TOLERANCE:g}) on a "
                                          "probe batch; the export is not written")
        info["size_bytes"] = {"onnx": onnx_path.stat().st_size}
        sessions: dict[str, Any] = {"onnx": ort_model}
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q_path = tmp / "model.int8.onnx"
            quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8)
            info["size_bytes"]["int8"] = q_path.stat().st_size
            sessions["int8"] = OrtModel(q_path)
        info["latency_ms"] = _latency(plain, sessions, tokenizer, inputs)
        if data is not None:
            info["metrics"] = _score(run, run_dir, {"pytorch": model, **sessions}, Path(data))
        _copy_side_files(model_folder(run_dir), tmp)
        atomic_write_json(tmp / "export.json", info)
    return info


def _latency(plain: nn.Module, sessions: dict[str, OrtModel], tokenizer: Any, inputs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch in (1, 32):
        probe = _probe(tokenizer, inputs, batch, 64, 2)
        row = {}
        with torch.no_grad():
            row["pytorch"] = _median_ms(lambda p=probe: plain(*p))
        for name, s in sessions.items():
            row[name] = _median_ms(lambda s=s, p=probe: s(**dict(zip(inputs, p, strict=True))))
        out[f"batch_{batch}_seq_64"] = row
    return out


def _score(run: Any, run_dir: Path, models: dict[str, Any], data: Path) -> dict[str, dict[str, float]]:
    """The run's own metrics on ``data`` with each model (PyTorch and each onnxruntime session)."""
    from tuneforge.engine import Runtime
    from tuneforge.eval import flatten_metrics
    from tuneforge.objectives import get_objective

    objective = get_objective(run)
    objective.from_saved(model_folder(run_dir))  # the label set and the like
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(run_dir))
    batches = objective.prepare(objective.read_split(data), tokenizer, run)
    bs = run.train.eval_batch_size or 2 * run.train.batch_size
    scores = {}
    for name, model in models.items():
        m = objective.evaluate(model, batches, batch_size=bs, runtime=Runtime.cpu())
        scores[name] = {k: round(v, 6) for k, v in flatten_metrics(m).items()}
    return scores


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, config and label files (not weights or method files)."""
    from tuneforge.export.merge import _METHOD_FILES, _WEIGHT_SUFFIXES

    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, dst / f.name)
        elif f.name not in _METHOD_FILES and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)
    if not (dst / "config.json").exists() and (src / "config.json").exists():
        shutil.copy2(src / "config.json", dst / "config.json")
