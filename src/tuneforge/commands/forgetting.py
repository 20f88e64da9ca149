"""The ``forgetting-table`` verb: one recipe under several cures for forgetting (see `tuneforge.forgetting_table`)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("forgetting-table")
    def forgetting_table(
        args: Annotated[list[str] | None, typer.Argument(
            help="RECIPE.yaml and/or key=value overrides; variants=none,l2sp,ewc,replay,distill, general_train=FILE, "
                 "variant.NAME.KEY=VALUE, output_dir=DIR", show_default=False)] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output_dir")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines")] = False,
    ) -> None:
        """Train the recipe with each cure for forgetting; write forgetting_table.md/.json/.png."""
        from tuneforge.cli import _split_recipe
        from tuneforge.errors import TrainingError
        from tuneforge.forgetting_table import forgetting_table as run_table
        from tuneforge.forgetting_table import split_table_overrides

        recipe, overrides = _split_recipe(args)
        variants, options, general, out, rest = split_table_overrides(overrides)
        out = out or Path("runs") / "forgetting-table"
        command = "tuneforge forgetting-table " + " ".join(shlex.quote(a) for a in (args or []))
        rows = run_table(recipe, rest, variants, options, general, out, overwrite=overwrite, quiet=quiet,
                         command=command)
        typer.echo((out / "forgetting_table.md").read_text(encoding="utf-8"))
        failed = [r.variant for r in rows if r.error]
        if failed:
            raise TrainingError(f"{len(failed)} variant(s) failed ({', '.join(failed)}); see {out / 'logs'}")
