"""Load a recipe: YAML file (optional) + ``key=value`` dotted overrides -> validated `RunConfig`.

Overrides follow torchtune's convention: ``train.lr=1e-4``, ``data.header=false``. Values are parsed as
YAML scalars (so ``true``, ``3``, ``null`` and lists work). For the named blocks ``model``, ``method``
and ``task`` a bare value is shorthand for the block's name (``method=lora``); switching a method or
task to a different name drops the old block's options, since they belonged to the old choice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tuneforge.config.schema import RunConfig
from tuneforge.errors import ConfigError

__all__ = ["apply_overrides", "load_config", "parse_override", "to_yaml"]

_NAMED_BLOCKS = ("model", "method", "task")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into its key and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ConfigError(f"'{key}' is not a dotted config key", key=key)
    if _FLOAT_RE.match(raw.strip()):  # YAML 1.1 reads "1e-3" as a string
        return key, float(raw)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a nested dict, in order."""
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or isinstance(child, str):
                # a shorthand like `method: lora` becomes a block when a sub-key is set
                child = {"name": child} if isinstance(child, str) else {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set a sub-key of a {type(child).__name__}", key=".".join(parts[: i + 1]))
            node = child
        last = parts[-1]
        if len(parts) == 1 and last in _NAMED_BLOCKS and not isinstance(value, dict):
            node[last] = _rename_block(node.get(last), value, keep_options=last == "model")
        else:
            node[last] = value
    return tree


def _rename_block(current: Any, name: Any, keep_options: bool) -> Any:
    # Options set before any name (``method.r=8 method=lora``) belong to the name that follows.
    if isinstance(current, dict) and (keep_options or current.get("name") in (None, name)):
        return {**current, "name": name}
    return {"name": name}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of blocks (model, task, method, data, train, output_dir)")
    return tree


def _format_validation_error(err: ValidationError, tree: dict[str, Any]) -> ConfigError:
    lines = []
    first_key = None
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
        # drop pydantic's union/tag markers that are not user keys
        loc = [p for p in loc if not p.endswith("]") and p not in ("str", "int", "float", "bool", "none")]
        key = ".".join(loc) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        if key == "(root)" and re.match(r"^[a-z_]+\.[a-z_.]+ ", msg):  # cross-field checks lead with their key
            key, msg = msg.split(" ", 1)
        first_key = first_key or key
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _allowed_keys_hint(loc, tree)
        lines.append(f"  {key}: {msg}")
    head = "invalid configuration:\n" + "\n".join(lines)
    return ConfigError(head, key=None) if len(lines) > 1 else ConfigError(lines[0].split(": ", 1)[1], key=first_key)


def _allowed_keys_hint(loc: list[str], tree: dict[str, Any]) -> str:
    from tuneforge.config import schema

    if len(loc) == 1:
        return "; allowed top-level keys: " + ", ".join(schema.RunConfig.model_fields)
    blocks: dict[str, Any] = {"model": schema.ModelConfig, "data": schema.DataConfig, "train": schema.TrainConfig}
    if loc[0] in ("method", "task"):
        block = tree.get(loc[0])
        name = block.get("name") if isinstance(block, dict) else block
        registry = schema._METHOD_CONFIGS if loc[0] == "method" else schema._TASK_CONFIGS
        blocks[loc[0]] = registry.get(name)
    cls = blocks.get(loc[0])
    if cls is not None:
        return "; allowed keys: " + ", ".join(cls.model_fields)
    return ""


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read an optional recipe file, apply overrides and validate. Raises `ConfigError`."""
    tree: dict[str, Any] = _read_yaml(Path(recipe)) if recipe else {}
    tree = apply_overrides(tree, list(overrides or []))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise _format_validation_error(e, tree) from None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (paths as strings), suitable to re-run the same job."""
    data = cfg.model_dump(mode="json")
    data["train"]["lr"] = cfg.lr
    return yaml.safe_dump(data, sort_keys=False)
