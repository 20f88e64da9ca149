"""The ``ui`` verb: a local web app over a runs folder (see `tuneforge.ui`). Needs the ``ui`` extra."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def ui(
        runs: Annotated[Path, typer.Option("--runs", help="the runs folder to list, and where new runs go")] = Path("runs"),
        host: Annotated[str, typer.Option(help="address to bind (loopback by default: not exposed)")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port")] = 7860,
        device: Annotated[str, typer.Option(help="device of the 'try it' models: auto | cpu | cuda | cuda:N | mps")] = "auto",
    ) -> None:
        """Open a local web app: runs list, live curves, a new-run form generated from the config schema,
        compare and forgetting tables, and chat/classify with trained runs."""
        from tuneforge.ui import require_extra

        require_extra()
        from tuneforge.ui import run_ui

        run_ui(runs, host, port, device)
