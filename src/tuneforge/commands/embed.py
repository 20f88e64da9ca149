"""The ``embed`` verb: sentence vectors of a file's texts (see `tuneforge.embedding`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def embed(
        target: Annotated[Path, typer.Argument(help="a task=contrastive run, a registry model name or an HF folder")],
        input: Annotated[Path, typer.Option("--input", help="texts: txt (one per line) or a table (data.text_column)")],
        output: Annotated[Path, typer.Option("--output", help="G.npy (float32 [N, H]) or G.jsonl")],
        overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides (e.g. data.text_column=s)")] = None,
    ) -> None:
        """Write one sentence vector per input text."""
        from tuneforge.embedding import embed_file

        n = embed_file(target, input, output, list(overrides or []))
        typer.echo(f"wrote {n} embeddings to {output}")
