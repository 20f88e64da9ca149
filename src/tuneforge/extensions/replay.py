"""Replay as a run extension: wraps the training batches in `tuneforge.data.replay.ReplayBatches`.

The general file is read and checked by the objective when the run starts (the training data's layout:
labelled rows for classification, text for a language model), tokenized the same way as the domain data,
and ``ratio`` of the training steps then come from it. ``retain: {replay: {data: FILE, ratio: 0.25}}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.data.replay import ReplayBatches, replay_batches
from tuneforge.errors import ConfigError
from tuneforge.extensions.base import Extension, RunContext

__all__ = ["Replay", "create"]


def create(run: Any, cfg: Any, objective: Any, data: Any, listed: bool) -> Replay:
    if not Path(cfg.data).exists():
        raise ConfigError(f"file not found: {cfg.data}", key="retain.replay.data")
    return Replay(run, cfg, objective, objective.read_split(Path(cfg.data)))


class Replay(Extension):
    """Interleaves general batches with the domain's (see module docstring)."""

    def __init__(self, run: Any, cfg: Any, objective: Any, general: Any):
        self.run, self.cfg, self.objective, self.general = run, cfg, objective, general

    def train_data(self, data: Any, ctx: RunContext) -> ReplayBatches:
        if ctx.training_view:
            raise ConfigError(f"replay mixes raw general batches into training; method '{self.run.method.name}' "
                              "trains on cached features: set method.cache_features=false", key="retain.replay")
        general = self.objective.prepare(self.general, ctx.built.tokenizer, self.run)
        out = ReplayBatches(data, general, self.cfg.ratio)
        n_domain = -(-len(data) // self.run.train.batch_size)
        ctx.say(f"replay: {replay_batches(n_domain, self.cfg.ratio):,} general batches per epoch beside "
                f"{n_domain:,} domain ones, from {self.cfg.data} ({len(general):,} examples)")
        return out
