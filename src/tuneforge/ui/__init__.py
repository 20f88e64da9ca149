"""``tuneforge ui``: a local web app to launch, watch, compare and try runs (extra ``ui``).

Layout: `runs` (what a runs folder holds: runs, status, metrics, tables; paths confined to the folder),
`form` (the new-run form walked from the pydantic `RunConfig` and the registries, form values to CLI
overrides, errors to fields), `jobs` (``tuneforge train`` children: start, SIGINT stop, resume), `tryit`
(the `tuneforge serve` app mounted under ``/serve``), `app` (`create_app`: pages and JSON endpoints),
``templates/`` (Jinja2) and ``static/`` (the page script, CSS and the vendored uPlot chart library; no CDN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["create_app", "require_extra", "run_ui"]


def require_extra() -> None:
    """Raise a clear error when the ``ui`` extra (fastapi, uvicorn, jinja2, markdown-it-py) is missing."""
    import importlib.util

    from tuneforge.errors import ConfigError

    missing = [m for m in ("fastapi", "uvicorn", "jinja2", "markdown_it") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the UI needs {', '.join(missing)}: pip install 'tuneforge[ui]' (or `make setup`)")


def create_app(*args: Any, **kwargs: Any) -> Any:
    """The FastAPI app (see `tuneforge.ui.app.create_app`)."""
    require_extra()
    from tuneforge.ui.app import create_app as make

    return make(*args, **kwargs)


def run_ui(runs: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str = "auto") -> None:
    """Serve the UI until interrupted."""
    import typer
    import uvicorn

    from tuneforge.ui.app import LOOPBACK

    loopback = host in LOOPBACK
    app = create_app(runs, device=device, allowed_hosts=None if loopback else ["*"])
    typer.echo(f"tuneforge ui on http://{'127.0.0.1' if host == '::1' else host}:{port}/ (runs folder: "
               f"{Path(runs).resolve()})")
    if not loopback:
        typer.echo("warning: listening beyond loopback; anyone who reaches this address can start runs", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
