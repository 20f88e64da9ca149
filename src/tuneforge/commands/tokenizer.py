"""The ``tokenizer`` verb group: ``tuneforge tokenizer train`` (see `tuneforge.tokenizers_train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Train tokenizers for pretraining from scratch.", no_args_is_help=True)

    @group.command("train")
    def train(
        more_files: Annotated[list[str] | None, typer.Argument(
            help="more corpus files (so `--files a.txt b.txt` works)", show_default=False)] = None,
        files: Annotated[list[str] | None, typer.Option(
            "--files", help="corpus files (.txt lines or .jsonl 'text'), folders or globs")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="output folder (loads with AutoTokenizer)")] = None,
        type_: Annotated[str, typer.Option("--type", help="bytelevel-bpe | bpe | wordpiece | unigram")] = "bytelevel-bpe",
        vocab_size: Annotated[int, typer.Option("--vocab-size", help="size of the vocabulary, specials included")] = 8000,
        family: Annotated[str | None, typer.Option(
            "--family", help="bert | roberta | gpt2 | llama | t5: special tokens and post-processor "
            "(default by type: gpt2, llama, bert, t5)")] = None,
        min_frequency: Annotated[int, typer.Option("--min-frequency", help="BPE/WordPiece: least count of a merge")] = 2,
        holdout: Annotated[float, typer.Option("--holdout", help="share of each file's documents held out for the "
                                               "coverage statistics")] = 0.05,
        lowercase: Annotated[bool | None, typer.Option("--lowercase/--no-lowercase",
                                                       help="lowercase text (default: only for bert)")] = None,
        max_length: Annotated[int, typer.Option("--max-length", help="model_max_length saved with it")] = 512,
    ) -> None:
        """Train a tokenizer on text files and print coverage statistics on held-out documents."""
        from tuneforge.errors import ConfigError
        from tuneforge.tokenizers_train import train_tokenizer

        paths = [*(files or []), *(more_files or [])]
        if not paths:
            raise ConfigError("give corpus files with --files F [F ...]", key="--files")
        if out is None:
            raise ConfigError("give the output folder with --out DIR", key="--out")
        report = train_tokenizer(paths, out, type=type_, vocab_size=vocab_size, family=family,
                                 min_frequency=min_frequency, holdout=holdout, lowercase=lowercase,
                                 max_length=max_length)
        typer.echo(report.summary())

    app.add_typer(group, name="tokenizer")
