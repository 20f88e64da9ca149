"""The ``merge`` verb: fold a trained run's method into a plain Hugging Face folder (see `tuneforge.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def merge(
        run_dir: Annotated[Path, typer.Argument(help="a run directory written by `tuneforge train`")],
        out_dir: Annotated[Path, typer.Argument(help="where the merged folder goes: a plain HF folder "
                                              "(from_pretrained(OUT_DIR)) with tuneforge's config.yaml beside")],
        export: Annotated[bool, typer.Option("--export", help="for methods that cannot merge (prefix, prompt...): "
                                             "write a self-contained folder with a copy of the base model")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty OUT_DIR")] = False,
        task: Annotated[str | None, typer.Option("--task", help="multi-task runs: write this one task as a plain "
                                                  "single-task run (OUT_DIR loads in transformers)")] = None,
    ) -> None:
        """Merge LoRA / DoRA / IA3 / QLoRA weights into the base model: OUT_DIR loads in plain transformers."""
        from tuneforge.export import merge_run

        res = merge_run(run_dir, out_dir, export=export, overwrite=overwrite, task=task)
        model = res.out_dir
        if res.kind == "merged":
            typer.echo(f"merged '{res.method}' into {model} (merged vs unmerged logits on a probe batch: max "
                       f"|diff| {res.max_abs_diff:.2e}); it loads with transformers alone (from_pretrained)")
        elif res.kind == "task":
            typer.echo(f"wrote task '{task}' ('{res.method}' folded in) to {model} (vs the multi-task model on a probe "
                       f"batch: max |diff| {res.max_abs_diff:.2e}); it loads with transformers alone")
        elif res.kind == "copied":
            typer.echo(f"method '{res.method}' saves plain weights already; copied to {model}")
        else:
            typer.echo(f"exported '{res.method}' with a copy of its base model to {res.out_dir} "
                       f"(tuneforge predict/eval {res.out_dir} ...)")

    @app.command("export")
    def export_cmd(
        run_dir: Annotated[Path, typer.Argument(help="a run directory written by `tuneforge train`")],
        out_dir: Annotated[Path, typer.Argument(help="where the exported model goes")],
        format: Annotated[str, typer.Option("--format", help="onnx (verified against PyTorch) or hf (= merge)")] = "onnx",
        int8: Annotated[bool, typer.Option("--int8", help="onnx: also a dynamically int8-quantised model")] = False,
        data: Annotated[Path | None, typer.Option("--data", help="score PyTorch / ONNX / int8 on this labelled file")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty OUT_DIR")] = False,
    ) -> None:
        """Export a run: ONNX (opset 18, dynamic batch and sequence, checked with onnxruntime) or a merged HF folder."""
        import json

        from tuneforge.errors import ConfigError

        if format == "hf":
            from tuneforge.export import merge_run

            res = merge_run(run_dir, out_dir, overwrite=overwrite)
            typer.echo(f"{res.kind} '{res.method}' into {res.out_dir}")
            return
        if format != "onnx":
            raise ConfigError(f"unknown export format '{format}'; allowed: onnx, hf", key="--format")
        from tuneforge.export.onnx import export_onnx

        info = export_onnx(run_dir, out_dir, int8=int8, data=data, overwrite=overwrite)
        typer.echo(f"wrote {out_dir / 'model.onnx'} (opset {info['opset']}; onnxruntime vs PyTorch max |diff| "
                   f"{info['max_abs_diff']:.2e} <= {info['tolerance']:g})")
        typer.echo(json.dumps({k: info[k] for k in ("size_bytes", "latency_ms", *(["metrics"] if "metrics" in info else []))},
                              indent=1))

