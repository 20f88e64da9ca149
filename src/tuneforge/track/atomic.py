"""Atomic file and directory writes for every artefact a run produces.

A run can be killed at any instant (Ctrl-C, OOM killer, SIGKILL, power loss). Each writer here
first writes a temp file in the destination's own directory, fsyncs it, then ``os.replace``s it
onto the final name, so a reader only ever sees the old content or the complete new content,
never a half-written file. ``atomic_directory`` does the same for whole folders (checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_yaml",
    "to_jsonable",
    "to_yamlable",
]

_FILE_MODE = 0o644


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename itself) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent directories as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types: non-finite floats become None, paths strings,
    tuples/sets lists, numpy/torch scalars Python numbers; anything else unknown becomes ``str``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return to_jsonable(obj.item())
    if hasattr(obj, "tolist"):
        with contextlib.suppress(Exception):
            return to_jsonable(obj.tolist())
    if hasattr(obj, "model_dump"):  # pydantic models
        with contextlib.suppress(Exception):
            return to_jsonable(obj.model_dump(mode="json"))
    return str(obj)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (key order kept, NaN/inf as null, trailing newline)."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def to_yamlable(obj: Any) -> Any:
    """Like ``to_jsonable`` but keeps floats as they are (YAML represents .nan / .inf)."""
    if isinstance(obj, float):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_yamlable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_yamlable(v) for v in obj]
    return to_jsonable(obj)


def atomic_write_yaml(path: Path, obj: Any) -> None:
    """Write ``obj`` as block-style YAML, keeping key order."""
    text = yaml.safe_dump(to_yamlable(obj), sort_keys=False, allow_unicode=True, default_flow_style=False)
    atomic_write_text(path, text)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` so the rename publishes durable content."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file_path = os.path.join(dirpath, name)
            if os.path.islink(file_path):
                continue
            fd = os.open(file_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``final``; publish it as ``final`` on success.

    On normal exit the files are fsynced, an existing ``final`` is renamed aside, the temp dir
    is renamed onto ``final`` and the old copy deleted. On exception the temp dir is removed and
    the exception re-raised, leaving any previous ``final`` untouched. A kill in the instant
    between the two renames leaves the previous copy as ``.{name}.old-*`` beside ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    try:
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{tag}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()
