"""Reward sources of the rollout objectives (``task.reward``): a tuneforge run or a Python function.

* a reward-model run (``task: reward``): the scalar score of (prompt, completion) rendered as a one-turn
  conversation, as the reward model was trained (`objectives.reward`);
* a classifier run (``task: classification``): the probability of ``task.reward_label`` for the prompt followed
  by the completion (``task.reward_text: full``) or the completion alone, e.g. an SST-2 run's positive class;
* ``module:function``: ``function(prompts, completions)`` with two lists of strings, returning one real number
  per completion (the module is imported from the working directory or the Python path).

`check_reward` validates the source before any model loads (the run's kind and label, the function's
import); `load_reward` builds the callable. Whatever a function raises or returns that is not a finite
number is a `ConfigError` naming ``task.reward`` (exit code 2).
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError, TuneforgeError

__all__ = ["RewardFn", "RewardSpec", "check_reward", "load_reward"]

_FUNCTION_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
RUN_KINDS = ("reward", "classification")

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass(frozen=True)
class RewardSpec:
    """What ``task.reward`` names: ``kind`` is ``function``, ``reward`` or ``classification``."""

    kind: str
    target: str
    label_index: int | None = None


def _import_function(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # any failure to import is the user's module
        raise ConfigError(f"cannot import module '{module}' of reward function '{target}': {type(e).__name__}: {e}",
                          key="task.reward") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ConfigError(f"'{module}' has no callable '{name}' (reward function '{target}')", key="task.reward")
    return fn


def check_reward(task: Any) -> RewardSpec:
    """Validate ``task.reward`` (and ``task.reward_label``) without loading a model."""
    target = task.reward
    path = Path(target)
    if path.is_dir():
        from tuneforge.inference import load_run

        try:
            run = load_run(path, [])
        except ConfigError as e:
            raise ConfigError(str(e).removeprefix("config error: "), key="task.reward") from None
        kind = run.task.name
        if kind not in RUN_KINDS:
            raise ConfigError(f"{path} is a '{kind}' run; task.reward takes a reward-model run (task: reward), a "
                              "classifier run (task: classification) or a function 'module:function'", key="task.reward")
        if kind == "reward":
            return RewardSpec("reward", target)
        from tuneforge.objectives.classification import read_label_map

        labels = [str(x) for x in read_label_map(path / "model")]
        if task.reward_label is None or str(task.reward_label) not in labels:
            given = "is not set" if task.reward_label is None else f"'{task.reward_label}' is not one of them"
            raise ConfigError(f"{path} is a classifier with labels {', '.join(labels)}; task.reward_label {given}",
                              key="task.reward_label")
        return RewardSpec("classification", target, labels.index(str(task.reward_label)))
    if _FUNCTION_RE.match(target):
        _import_function(target)
        return RewardSpec("function", target)
    raise ConfigError(f"'{target}' is neither a run directory nor a function 'module:function'", key="task.reward")


def _checked(values: Any, n: int, what: str) -> list[float]:
    """``values`` as n finite floats, or a `ConfigError` naming ``task.reward``."""
    try:
        items = list(values)
    except TypeError:
        raise ConfigError(f"{what} returned {type(values).__name__}, not a sequence of {n} numbers",
                          key="task.reward") from None
    if len(items) != n:
        raise ConfigError(f"{what} returned {len(items)} values for {n} completions", key="task.reward")
    out = []
    for i, v in enumerate(items):
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{what} returned {v!r} for completion {i}; a reward must be a finite number",
                              key="task.reward")
        out.append(float(v))
    return out


def load_reward(task: Any, *, runtime: Any, batch_size: int = 32) -> RewardFn:
    """``reward(prompts, completions) -> [float]`` for the source ``task.reward`` names (models on ``runtime``)."""
    spec = check_reward(task)
    if spec.kind == "function":
        fn = _import_function(spec.target)

        def call(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
            try:
                values = fn(list(prompts), list(completions))
            except TuneforgeError:
                raise
            except Exception as e:  # the user's function failed: say which and how
                raise ConfigError(f"reward function '{spec.target}' raised {type(e).__name__}: {e}",
                                  key="task.reward") from None
            return _checked(values, len(completions), f"reward function '{spec.target}'")

        return call

    from tuneforge.inference import load_run
    from tuneforge.objectives import get_objective

    path = Path(spec.target)
    run = load_run(path, [])
    objective = get_objective(run)
    built = objective.from_saved(path / "model")
    built.model = runtime.move(built.model).eval()
    built.model.requires_grad_(False)

    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if spec.kind == "reward":
            rows = objective.predict(built, list(prompts), list(completions), batch_size=batch_size, runtime=runtime)
            return [float(r["reward"]) for r in rows]
        texts = [p + c if task.reward_text == "full" else c for p, c in zip(prompts, completions, strict=True)]
        texts = [t if t.strip() else "." for t in texts]  # an empty completion still gets a score
        rows = objective.predict(built, texts, None, batch_size=batch_size, runtime=runtime)
        label = objective.labels[spec.label_index]
        return [float(r[f"p_{label}"]) for r in rows]

    return score
