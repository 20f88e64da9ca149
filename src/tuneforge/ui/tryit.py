"""Try a run: the `tuneforge serve` app, mounted inside the UI under ``/serve``, with runs loaded on demand.

Nothing is re-implemented: a run is loaded by the server's own `ModelPool.add_model` on the server's worker
thread, and the page talks to the server's own routes (``/serve/v1/chat/completions`` streamed for decoder
runs, ``/serve/v1/completions`` for plain language models, ``/serve/v1/classify``, ``/tag`` and ``/answer``
for encoder runs), so the UI answers exactly what ``tuneforge serve RUN`` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

__all__ = ["TryIt"]

#: decoding caps for the UI's own server (a local, single-user page)
_SETTINGS = {"max_tokens_cap": 512, "default_max_tokens": 128, "max_batch_size": 8, "batch_window_ms": 0.0}


class TryIt:
    """The embedded server and the runs it has loaded (named by their run id)."""

    def __init__(self, device: str = "auto", max_loaded: int = 4):
        from tuneforge.serve.app import create_app
        from tuneforge.serve.pool import ModelPool
        from tuneforge.serve.settings import ServeSettings

        self.pool = ModelPool(max_loaded=max_loaded, device=device)
        self.app = create_app(self.pool, ServeSettings(device=device, **_SETTINGS))
        self.state = self.app.state.serve

    def describe(self, name: str) -> dict[str, Any]:
        """What the page needs to talk to a loaded run: its kind and the route that serves it."""
        from tuneforge.serve.pool import task_routes

        entry = self.pool.get(name)
        if entry.kind == "generative":
            route = "chat" if entry.chat else "complete"
        else:
            route = task_routes().get(entry.task or "", "")
        return {"model": name, "kind": entry.kind, "task": entry.task, "route": route}

    async def load(self, name: str, run_dir: Path) -> dict[str, Any]:
        """Load the run (once) into the server and describe it; `TuneforgeError` when it cannot be served."""
        if name not in self.pool.names():
            def load() -> None:
                if name not in self.pool.names():
                    self.pool.add_model(str(run_dir), name)

            await self.state.on_worker(load)
        info = self.describe(name)
        if not info["route"]:
            raise TuneforgeError(f"a '{info['task']}' run has no try-it page (the server serves it at "
                                 "/v1/embeddings)")
        return info

    def close(self) -> None:
        self.state.batcher.stop()
