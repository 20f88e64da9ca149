"""Named registries of plugins (methods, objectives, extensions, loops): a leaf module, imported by config.

Every plugin kind is one `Registry`. Registering a name twice is an error (as peft does), so two
plugins can never silently shadow each other. A registry knows the package whose import runs its
one-line registrations (``loader``) and imports it on first lookup, so `tuneforge.config` validates a
recipe without importing the plugin packages itself (and without torch: their config classes live in
torch-free modules).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from tuneforge.errors import ConfigError

__all__ = ["EXTENSIONS", "LOOPS", "METHODS", "OBJECTIVES", "Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> item, with a clear error for unknown names and for second registrations."""

    def __init__(self, kind: str, key: str, loader: str | None = None):
        self.kind, self.key, self.loader = kind, key, loader
        self._items: dict[str, T] = {}
        self._loaded = loader is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.loader)  # runs the package's register(...) lines

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; a name already taken raises `ValueError` (nothing is replaced)."""
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register temporary plugins clean up with this)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The item named ``name``; unknown names raise `ConfigError` at ``key`` listing the allowed ones."""
        self._load()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; allowed: {', '.join(sorted(self._items))}", key=self.key)
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items))

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())


#: fine-tuning methods (`tuneforge.methods.base.MethodSpec`)
METHODS: Registry = Registry("method", "method", "tuneforge.methods")
#: training objectives (`tuneforge.objectives.base.ObjectiveSpec`)
OBJECTIVES: Registry = Registry("task", "task", "tuneforge.objectives")
#: run extensions (`tuneforge.extensions.base.ExtensionSpec`)
EXTENSIONS: Registry = Registry("extension", "extensions", "tuneforge.extensions")
#: training loop shapes (`tuneforge.engine.loops.LoopSpec`)
LOOPS: Registry = Registry("loop", "task", "tuneforge.engine.loops")
