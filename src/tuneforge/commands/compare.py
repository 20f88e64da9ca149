"""The ``compare`` verb: train one recipe under several methods and tabulate them (see `tuneforge.compare`)."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        args: Annotated[list[str] | None, typer.Argument(
            help="RECIPE.yaml and/or key=value overrides; methods=a,b,c (required), output_dir=DIR", show_default=False)] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output_dir")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines")] = False,
    ) -> None:
        """Train the same task, data, seed and budget with each method; write compare.md/.csv/.png."""
        from tuneforge.cli import _split_recipe
        from tuneforge.compare import compare as run_compare
        from tuneforge.compare import split_overrides
        from tuneforge.errors import TrainingError

        recipe, overrides = _split_recipe(args)
        methods, output_dir, rest = split_overrides(overrides)
        command = "tuneforge compare " + " ".join(shlex.quote(a) for a in (args or []))
        res = run_compare(recipe, rest, methods, output_dir, overwrite=overwrite, quiet=quiet, command=command)
        out = res.output_dir
        typer.echo((out / "compare.md").read_text(encoding="utf-8"))
        typer.echo(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}")
        if res.failed:
            names = ", ".join(r.method for r in res.failed)
            raise TrainingError(f"{len(res.failed)} method(s) failed ({names}); see {out / 'compare.md'} "
                                f"and {out / 'logs'}")
