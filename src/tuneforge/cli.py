"""The ``tuneforge`` command. Each verb is a thin call into the library.

Exit codes: 0 success; 2 bad input (config, data, usage); 3 training failure; 130 interrupted.
User errors print one clear line (no traceback); set ``TUNEFORGE_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from tuneforge.errors import ConfigError, TuneforgeError

app = typer.Typer(
    name="tuneforge",
    help="Pretrain and fine-tune transformer models (encoders, decoders, encoder-decoders) from one config.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Overrides = Annotated[list[str] | None, typer.Argument(help="RECIPE.yaml and/or key=value overrides", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or chatter")]
Task = Annotated[str | None, typer.Option("--task", help="multi-task runs: the task to use (see task.tasks)")]


def _split_recipe(args: list[str] | None) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the recipe file; the rest are overrides."""
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    stray = [a for a in args if "=" not in a]
    if stray:
        raise ConfigError(f"'{stray[0]}' is not a key=value override (a recipe file must come first)")
    return None, args


def _load(args: list[str] | None):
    from tuneforge.config import load_config

    recipe, overrides = _split_recipe(args)
    return load_config(recipe, overrides)


@app.command()
def train(
    args: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in output_dir from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output_dir")] = False,
    quiet: Quiet = False,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, help="start N processes on this machine with "
                                              "torchrun (data parallel; train.batch_size is per process)")] = None,
) -> None:
    """Train a model from an optional RECIPE.yaml plus key=value overrides."""
    from tuneforge.pipeline import train as run_train

    cfg = _load(args)
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from tuneforge.engine.launch import torchrun

        flags = [f for f, on in (("--resume", resume), ("--overwrite", overwrite), ("--quiet", quiet)) if on]
        sys.exit(torchrun(nproc, ["train", *(args or []), *flags]))
    command = "tuneforge train " + " ".join(shlex.quote(a) for a in (args or []))
    result = run_train(cfg, resume=resume, overwrite=overwrite, quiet=quiet, command=command)
    if os.environ.get("RANK", "0") != "0":  # under a launcher, rank 0 reports
        return
    ev = result.metrics.get("eval", {})
    shown = ", ".join(f"{k}={v:.4f}" for k, v in ev.items() if "/" not in k)
    typer.echo(f"done: {result.run_dir}  ({shown})")


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `tuneforge train` (or, with task=clm "
                                            "or task=sft, a registry model name or HF folder)")],
    data: Annotated[Path, typer.Option("--data", help="file to evaluate on (same layout as training data)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides (e.g. data.header=false)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a flat JSON object of metric -> value")] = False,
    task: Task = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate a trained run on a labelled file."""
    from tuneforge.inference import evaluate_file

    metrics = evaluate_file(run_dir, data, list(overrides or []), task)
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            typer.echo(f"{k:>24}  {v:.4f}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `tuneforge train`")],
    texts: Annotated[list[str] | None, typer.Argument(help="texts to classify")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="file of texts (csv/tsv/json/jsonl/parquet/txt)")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="write predictions here (.jsonl or .csv)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override for reading --input")] = None,
    task: Task = None,
) -> None:
    """Predict labels and class probabilities for texts or a file."""
    from tuneforge.inference import predict_texts, write_predictions

    if not texts and input is None:
        raise ConfigError("give texts to classify or --input FILE")
    rows = predict_texts(run_dir, list(texts or []), input, list(set_ or []), task)
    if output is not None:
        write_predictions(rows, output)
        typer.echo(f"wrote {len(rows)} predictions to {output}")
    else:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))


@app.command()
def validate(args: Overrides = None) -> None:
    """Validate a recipe (config, model name, data files, columns and labels) without training."""
    from tuneforge.inference import validate_run

    typer.echo(validate_run(_load(args)))


@app.command()
def models() -> None:
    """List the models usable by short name (offline), and the Hub models in the local Hugging Face cache."""
    from tuneforge.models import list_models
    from tuneforge.models.hub import cached_models, hub_cache_dir
    from tuneforge.models.registry import model_family

    rows = [(m.name, m.family, m.architecture, "yes" if m.available() else "no", m.description) for m in list_models()]
    rows += [(h.repo_id, model_family(h.folder), h.model_type, "cached",
              f"Hugging Face Hub, {h.size_bytes / 2**20:,.1f} MiB in {hub_cache_dir()}") for h in cached_models()]
    widths = [max(len(r[i]) for r in [*rows, ("name", "family", "arch", "ready", "")]) for i in range(4)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(("name", "family", "arch", "ready"), widths, strict=True)) + "  description")
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    typer.echo("\nAny local Hugging Face folder also works (model=/path/to/folder), and any Hub id (model=org/name): "
               "from the local Hugging Face cache offline, downloaded with HF_HUB_OFFLINE=0")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="where the demo run goes")] = Path("runs/demo"),
    quiet: Quiet = False,
) -> None:
    """Fine-tune the bundled MiniLM on bundled tweets (3-class sentiment), evaluate, predict."""
    from tuneforge.demo import run_demo

    run_demo(output_dir, quiet=quiet)


# Verbs added by later areas live in their own modules, each with ``register(app)``; one line each here.
COMMAND_MODULES: list[str] = [
    "tuneforge.commands.export",
    "tuneforge.commands.generate",
    "tuneforge.commands.tokenizer",
    "tuneforge.commands.compare",
    "tuneforge.commands.forgetting",
    "tuneforge.commands.embed",
    "tuneforge.commands.serve",
    "tuneforge.commands.ui",
]


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


def _quiet_libraries() -> None:
    """Offline by default; keep transformers' load reports and bars out of tuneforge's own output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import logging

    from transformers.utils import logging as hf_logging

    # bitsandbytes (imported by peft) logs a missing optional kernel package on every CPU start.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (method=qat; transformers imports it whenever it is installed) logs CUDA kernels it cannot load,
    # and torch's pytree a deprecation for torchao's enums, at import.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)

    hf_logging.disable_progress_bar()


def main() -> None:
    """Console entry point: maps errors to exit codes and clean messages."""
    import click

    _quiet_libraries()

    debug = bool(os.environ.get("TUNEFORGE_DEBUG"))
    try:
        code = app(standalone_mode=False)
    except TuneforgeError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.ClickException, typer.exceptions.TyperException) as e:
        # typer >= 0.2x parses with its own copy of click, whose usage errors (an unknown option, a bad
        # value) derive from TyperException rather than click's ClickException; both print usage + one line
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort, typer.Abort):
        typer.echo("interrupted; the last checkpoint is intact (continue with --resume)", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
