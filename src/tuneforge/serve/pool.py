"""What the server holds: named models, and adapters attached by name to a loaded base (LRU-bounded).

Names map to `Served` entries of three kinds:

* ``generative``: a causal LM. A *base* (a registry name or a plain HF folder) can carry adapters; an
  *adapter* entry (``parent`` = its base's name) is a saved method folder attached to that base with
  ``MethodRuntime.attach`` and made current with ``activate`` before each batch, so switching adapters
  costs no reload. A run directory given as a model of its own (merged, full or adapter run) is loaded
  whole (`tuneforge.generation.load_model`) and serves alone.
* ``encoder``: an encoder (e.g. ``minilm-l6``), for embeddings.
* ``task``: a classification, token-classification or extractive-QA run, served by its objective's
  ``predict`` on ``/v1/classify``, ``/v1/tag`` or ``/v1/answer``.

Model work (loading, attaching, computing) runs on the batcher's single worker thread, so the module an
adapter entry computes with is never switched under a running batch; the entry table itself is guarded
by a lock because routes read it from the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tuneforge.errors import ConfigError
from tuneforge.serve.errors import APIError
from tuneforge.serve.schemas import ModelCard
from tuneforge.track.rundir import is_run_dir, model_folder

__all__ = ["ModelPool", "Served", "task_routes"]

# The predicting objectives each task route serves (their ``predict`` rows have that route's shape).
def task_routes() -> dict[str, str]:
    """Objective name -> its task route (``/v1/<route>``), as each objective's spec declares it
    (``ObjectiveSpec.serve_route``): classification -> classify, token_classification -> tag, ..."""
    from tuneforge.objectives import OBJECTIVES

    return {name: spec.serve_route for name, spec in OBJECTIVES.items() if spec.serve_route}


@dataclass
class _Holder:
    """The module a base and its adapters share; ``model`` becomes a PeftModel when the first adapter attaches."""

    model: Any
    adapters: list[str] = field(default_factory=list)


@dataclass
class Served:
    """One name the server answers to (see module docstring for the kinds)."""

    name: str
    kind: Literal["generative", "encoder", "task"]
    source: str
    tokenizer: Any
    holder: _Holder | None = None
    chat: bool = False
    system_prompt: str | None = None
    parent: str | None = None
    folder: Path | None = None  # a base's plain model folder (adapters trained on it attach); else None
    method: Any = None  # adapters: their MethodRuntime
    task: str | None = None
    objective: Any = None
    built: Any = None
    runtime: Any = None
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float = field(default_factory=time.monotonic)

    @property
    def model(self) -> Any:
        return self.holder.model if self.holder is not None else self.built.model

    def card(self) -> ModelCard:
        root = self.parent or self.name
        return ModelCard(id=self.name, created=self.created, root=root, parent=self.parent, kind=self.kind,
                         task=self.task, source=self.source)


def _is_run(path: Path) -> bool:
    return is_run_dir(path)


def _run_chat(run_dir: Path) -> tuple[bool | None, str | None]:
    """(chat, system prompt) a generative run was trained for, as `generation.load_model` reads them."""
    from tuneforge.config import load_config
    from tuneforge.objectives import get_spec

    run = load_config(run_dir / "config.yaml")
    spec = get_spec(run.task.name)
    if not spec.generative:
        raise ConfigError(f"{run_dir} is a '{run.task.name}' run, not a causal LM: serve it as a model of its own")
    return spec.chat, run.task.model_dump().get("system_prompt")


class ModelPool:
    """Named served models and adapters; ``max_loaded`` adapters at most (least recently used evicted)."""

    def __init__(self, max_loaded: int = 8, device: str = "auto"):
        self.max_loaded = max_loaded
        self.device = device
        self._entries: dict[str, Served] = {}
        self._lock = threading.Lock()
        self.evictions = 0
        self.switches = 0
        self.switch_seconds = 0.0
        self._active: dict[int, str | None] = {}  # id(holder) -> adapter currently active on it

    # -- lookup ---------------------------------------------------------------------------------------
    def get(self, name: str, *, kind: str | None = None, route: str | None = None) -> Served:
        """The entry named ``name``: 404 when unknown, 400 when it cannot serve ``kind`` / task ``route``."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise APIError(404, f"The model '{name}' does not exist; served: {', '.join(self.names()) or 'none'}",
                           param="model", code="model_not_found")
        if kind == "generative" and entry.kind != "generative":
            raise APIError(400, f"'{name}' is a {entry.kind} model ({entry.task or 'no task'}); text generation "
                                "needs a causal LM", param="model", code="model_not_generative")
        if route is not None and (entry.kind != "task" or task_routes().get(entry.task or "") != route):
            fit = [e.name for e in self.entries() if e.kind == "task" and task_routes().get(e.task or "") == route]
            raise APIError(400, f"'{name}' is not a run this route serves ({route} needs a "
                                f"{_task_of(route)} run; served ones: {', '.join(fit) or 'none'})",
                           param="model", code="wrong_model_kind")
        entry.last_used = time.monotonic()
        return entry

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def entries(self) -> list[Served]:
        with self._lock:
            return list(self._entries.values())

    def adapters(self) -> list[Served]:
        return [e for e in self.entries() if e.parent is not None]

    def cards(self) -> list[ModelCard]:
        return [e.card() for e in self.entries()]

    def _add(self, entry: Served) -> Served:
        with self._lock:
            if entry.name in self._entries:
                raise APIError(409, f"the name '{entry.name}' is already served", param="name", code="name_taken")
            self._entries[entry.name] = entry
        return entry

    # -- loading models -------------------------------------------------------------------------------
    def add_model(self, target: str, name: str | None = None) -> Served:
        """Load ``target`` (registry name, HF folder or run directory) under ``name`` (default: ``target``)."""
        from tuneforge.generation import load_model
        from tuneforge.methods.saved import read_manifest
        from tuneforge.models.registry import model_family, resolve_model

        name = name or target.rstrip("/")
        path = Path(target)
        if _is_run(path):
            return self._add_run(path, name)
        folder = resolve_model(target)
        family = model_family(folder)
        if family == "decoder":
            loaded = load_model(folder, device=self.device)
            plain = read_manifest(folder) is None
            return self._add(Served(name, "generative", target, loaded.tokenizer, _Holder(loaded.model),
                                    chat=loaded.chat, folder=folder.resolve() if plain else None))
        if family == "encoder":
            from transformers import AutoModel, AutoTokenizer

            from tuneforge.engine.runtime import resolve_device
            from tuneforge.methods.saved import load_trained

            model = load_trained(AutoModel, folder).eval().to(resolve_device(self.device))
            return self._add(Served(name, "encoder", target, AutoTokenizer.from_pretrained(folder), _Holder(model)))
        raise ConfigError(f"'{target}' is an {family} model; the server serves causal LMs, encoders and "
                          f"{', '.join(task_routes())} runs", key="model")

    def _add_run(self, run_dir: Path, name: str) -> Served:
        from tuneforge.config import load_config
        from tuneforge.engine import Runtime
        from tuneforge.generation import load_model
        from tuneforge.objectives import get_objective, get_spec

        run = load_config(run_dir / "config.yaml")
        spec = get_spec(run.task.name)
        if spec.generative:
            loaded = load_model(run_dir, device=self.device)
            return self._add(Served(name, "generative", str(run_dir), loaded.tokenizer, _Holder(loaded.model),
                                    chat=loaded.chat, system_prompt=loaded.system_prompt))
        if run.task.name not in task_routes() and not spec.embeds:
            raise ConfigError(f"{run_dir} is a '{run.task.name}' run; the server serves causal LM runs, sentence "
                              f"encoders (task=contrastive) and {', '.join(task_routes())} runs", key="task")
        runtime = Runtime.create(self.device, "fp32")
        objective = get_objective(run)
        built = objective.from_saved(model_folder(run_dir))
        built.model = runtime.move(built.model).eval()
        return self._add(Served(name, "task", str(run_dir), built.tokenizer, chat=False, task=run.task.name,
                                objective=objective, built=built, runtime=runtime))

    # -- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | Path) -> Served:
        """Attach the adapter run (or its ``model/`` folder) ``path`` to the base it was trained on.

        Refused (400) with the reason when the folder holds no attachable adapter or its base is not
        served (the base is loaded first when no base is served at all); past ``max_loaded`` the least
        recently used adapter is unloaded.
        """
        from transformers import AutoTokenizer

        from tuneforge.methods import get_method
        from tuneforge.methods.saved import read_manifest

        path = Path(path)
        if not path.exists():
            raise APIError(400, f"{path} does not exist", param="path", code="adapter_not_found")
        chat, system = (None, None)
        folder = path
        if _is_run(path):
            chat, system = _run_chat(path)
            folder = model_folder(path)
        manifest = read_manifest(folder)
        if manifest is None:
            raise APIError(400, f"{path} holds a whole model, not an adapter (its method saved every weight): serve "
                                "it as a model of its own (`tuneforge serve PATH`)", param="path", code="not_an_adapter")
        method = get_method(manifest["method"]).runtime()
        if method.attach is None:
            raise APIError(400, f"{path} is a '{manifest['method']}' run, which cannot share a base with other "
                                f"adapters: {method.multi_unsupported}", param="path", code="not_attachable")
        want = Path(manifest["base_model"])
        if not want.is_absolute():
            want = folder / want
        base = self._base_for(want.resolve(), path)
        tok_src = folder if (folder / "tokenizer_config.json").is_file() else base.folder
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat is None:
            chat = tokenizer.chat_template is not None
        holder = base.holder
        assert holder is not None
        with self._lock:
            if name in self._entries:
                raise APIError(409, f"the name '{name}' is already served", param="name", code="name_taken")
        try:
            holder.model = method.attach(holder.model, folder, name)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise APIError(400, f"{path} cannot attach to '{base.name}': {e}", param="path",
                           code="adapter_incompatible") from None
        method.activate(holder.model, name)  # peft adds a second adapter inactive: make the record true
        self._active[id(holder)] = name
        holder.adapters.append(name)
        entry = self._add(Served(name, "generative", str(path), tokenizer, holder, chat=bool(chat),
                                 system_prompt=system, parent=base.name, method=method))
        self._evict(keep=name)
        return entry

    def _base_for(self, want: Path, path: Path) -> Served:
        bases = [e for e in self.entries() if e.kind == "generative" and e.folder is not None]
        for b in bases:
            if b.folder == want:
                return b
        if not bases:
            from tuneforge.models.registry import list_models

            named = [m.name for m in list_models() if m.available and m.path().resolve() == want]
            return self.add_model(str(want), named[0] if named else want.name)
        served = ", ".join(f"'{b.name}' ({b.folder})" for b in bases)
        raise APIError(400, f"{path} was trained on the base {want}, which this server does not hold (bases: "
                            f"{served}); start another server for that base", param="path", code="base_mismatch")

    def remove_adapter(self, name: str) -> None:
        """Unload the adapter ``name`` (404 when unknown, 400 when ``name`` is not an adapter)."""
        entry = self.get(name)
        if entry.parent is None:
            raise APIError(400, f"'{name}' is not an adapter; only adapters are unloaded at run time", param="name",
                           code="not_an_adapter")
        self._detach(entry)

    def _detach(self, entry: Served) -> None:
        holder = entry.holder
        assert holder is not None
        with self._lock:
            self._entries.pop(entry.name, None)
        holder.adapters.remove(entry.name)
        if self._active.get(id(holder)) == entry.name:
            self._active[id(holder)] = None
        model = holder.model
        if holder.adapters:
            entry.method.activate(model, holder.adapters[0])
            self._active[id(holder)] = holder.adapters[0]
            model.delete_adapter(entry.name)
        else:  # the last one: back to the plain base module (no empty adapter layers left behind)
            holder.model = model.unload() if hasattr(model, "unload") else model.get_base_model()
            self._active.pop(id(holder), None)

    def _evict(self, keep: str) -> None:
        while len(adapters := self.adapters()) > self.max_loaded:
            victim = min((a for a in adapters if a.name != keep), key=lambda a: a.last_used)
            self._detach(victim)
            self.evictions += 1

    # -- computing ------------------------------------------------------------------------------------
    @contextmanager
    def bound(self, entry: Served) -> Iterator[Any]:
        """The module computing as ``entry``: its adapter active, or a base with its adapters disabled.
        Called on the worker thread only (see module docstring)."""
        holder = entry.holder
        if holder is None:
            yield entry.built.model
            return
        model = holder.model
        if entry.parent is not None:
            if self._active.get(id(holder)) != entry.name:
                t0 = time.perf_counter()
                entry.method.activate(model, entry.name)
                self.switch_seconds += time.perf_counter() - t0
                self.switches += 1
                self._active[id(holder)] = entry.name
            yield model
            return
        ctx = model.disable_adapter() if holder.adapters else nullcontext()
        with ctx:
            yield model


def _task_of(route: str) -> str:
    return next(t for t, r in task_routes().items() if r == route)
