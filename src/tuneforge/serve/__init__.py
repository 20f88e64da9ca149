"""``tuneforge serve``: an OpenAI-compatible server over one base model and many adapters (extra ``serve``).

Layout: `settings` (limits), `pool` (named models, adapters attached to a loaded base, LRU eviction),
`batcher` (one worker thread; batches by model and options), `engine` (forward passes), `state` (job
handlers), `routes_openai` / `routes_tasks` / `routes_admin` (HTTP), `middleware` (size limit, API key,
metrics), `errors` (OpenAI error shape), `app` (`create_app`). Needs ``pip install 'tuneforge[serve]'``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModelPool", "ServeSettings", "build_pool", "create_app", "require_extra", "serve"]


def require_extra() -> None:
    """Raise a clear error when the ``serve`` extra (fastapi, uvicorn) is not installed."""
    import importlib.util

    from tuneforge.errors import ConfigError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"serving needs {', '.join(missing)}: pip install 'tuneforge[serve]' (or `make setup`)")


def __getattr__(name: str) -> Any:
    if name in ("build_pool", "create_app", "serve"):
        require_extra()
        from tuneforge.serve import app

        return getattr(app, name)
    if name == "ModelPool":
        require_extra()
        from tuneforge.serve.pool import ModelPool

        return ModelPool
    if name == "ServeSettings":
        from tuneforge.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(name)
