"""Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
networks"): pull each weight back toward its starting value in proportion to how much the general data
needs it.

    loss += lambda/2 * sum_i F_i (w_i - w0_i)^2

``F`` is the diagonal empirical Fisher of the objective's own loss on ``fisher_data`` at the starting weights:
the mean over examples of the **squared per-example gradient** (not the square of a batch gradient, a common
shortcut that underestimates it). Per-example gradients come from `torch.func` (``vmap`` of ``grad`` over
examples of equal length, so no padding and no attention-mask branches), or, where a model or objective
cannot be vmapped (data-dependent shapes, e.g. a language model scoring only its labelled positions), from a
plain loop of one backward pass per example; both give the same numbers (tested). The model is in eval
mode (no dropout) and fp32 while measuring.

The Fisher is computed once and cached in the run directory (``ewc_fisher.safetensors``); a resumed run reads
it instead of recomputing. The anchored weights are those of `extensions.anchors` (every trainable weight but
the task head, whose general-data loss does not exist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.extensions.anchors import Anchors, anchors
from tuneforge.extensions.base import Extension, RunContext

__all__ = ["EWC", "FISHER_FILE", "create", "empirical_fisher", "ewc_penalty"]

FISHER_FILE = "ewc_fisher.safetensors"
_CHUNK = 16  # examples per vmap call


def create(run: Any, cfg: Any, objective: Any, data: Any, listed: bool) -> EWC:
    """Reads and checks the general data now, before any model loads."""
    if not Path(cfg.fisher_data).exists():
        raise ConfigError(f"file not found: {cfg.fisher_data}", key="retain.ewc.fisher_data")
    if run.method.head_only:
        raise ConfigError(f"ewc has no weights to hold: method '{run.method.name}' trains only a task head",
                          key="retain.ewc")
    return EWC(run, cfg, objective, objective.read_split(Path(cfg.fisher_data)))


class _Functional:
    """``model`` called with ``params`` swapped in (`torch.func.functional_call`); other attributes are the
    model's, so an objective's ``forward`` runs on it unchanged."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self.model, self.params, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _sample_loss(objective: Any, model: nn.Module, params: dict[str, torch.Tensor],
                 example: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = {k: v[None] for k, v in example.items()}
    return objective.loss(objective.forward(_Functional(model, params), batch), batch)


def empirical_fisher(objective: Any, model: nn.Module, examples: list[dict[str, torch.Tensor]],
                     names: list[str], *, use_vmap: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Mean of squared per-example gradients of ``objective``'s loss w.r.t. the parameters ``names``.

    ``examples`` are single-example batches without padding (``attention_mask`` is dropped: all ones).
    Returns the Fisher per name and how it was computed (``vmap`` or ``loop``).
    """
    from torch.func import grad, vmap

    live = dict(model.named_parameters())
    params = {n: live[n].detach() for n in names}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    rows = [{k: v[0] for k, v in ex.items() if k != "attention_mask"} for ex in examples]
    was_training = model.training
    model.eval()
    how = "vmap"
    try:
        if use_vmap:
            by_shape: dict[tuple, list[dict[str, torch.Tensor]]] = {}
            for r in rows:
                by_shape.setdefault(tuple((k, tuple(v.shape)) for k, v in sorted(r.items())), []).append(r)
            per_sample = vmap(grad(lambda p, ex: _sample_loss(objective, model, p, ex)), in_dims=(None, 0))
            try:
                for group in by_shape.values():
                    for i in range(0, len(group), _CHUNK):
                        chunk = {k: torch.stack([r[k] for r in group[i : i + _CHUNK]]) for k in group[0]}
                        with torch.no_grad():  # func.grad still differentiates; nothing links to the live graph
                            g = per_sample(params, chunk)
                        for n in names:
                            total[n] += g[n].detach().pow(2).sum(0)
            except RuntimeError:  # data-dependent control flow or shapes: per-example backward passes instead
                total = {n: torch.zeros_like(p) for n, p in params.items()}
                use_vmap = False
        if not use_vmap:
            how = "loop"
            for r in rows:
                with torch.enable_grad():
                    sub = {n: p.clone().requires_grad_(True) for n, p in params.items()}
                    grads = torch.autograd.grad(_sample_loss(objective, model, sub, r), [sub[n] for n in names],
                                                allow_unused=True)
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        total[n] += g.detach().pow(2)
    finally:
        model.train(was_training)
    return {n: t / max(1, len(rows)) for n, t in total.items()}, how


def ewc_penalty(a: Anchors, fisher: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """``lambda/2 sum_i F_i (w_i - w0_i)^2`` over the anchored weights (a 0-d tensor, differentiable in w)."""
    terms = [(fisher[n] * (p - p0).pow(2)).sum() for n, p, p0 in a.anchored if n in fisher]
    return lam / 2 * torch.stack(terms).sum() if terms else torch.zeros(())


class EWC(Extension):
    """The EWC term (see module docstring)."""

    def __init__(self, run: Any, cfg: Any, objective: Any, general: Any):
        self.run, self.cfg, self.objective, self.general = run, cfg, objective, general
        self.anchors = Anchors()
        self.fisher: dict[str, torch.Tensor] = {}

    def _examples(self, ctx: RunContext) -> list[dict[str, torch.Tensor]]:
        data = self.objective.prepare(self.general, ctx.built.tokenizer, self.run)
        order = data.plan(0, 1, seed=self.run.train.seed, shuffle=True)[: self.cfg.fisher_samples]
        return [ctx.runtime.to_device(data.collate(indices)) for indices in order]

    def on_train_start(self, ctx: RunContext) -> None:
        from safetensors.torch import load_file, save_file

        self.anchors = anchors(ctx.model, ctx.head_names)
        names = [n for n, _, _ in self.anchors.anchored]
        if not names:
            raise ConfigError(f"ewc has no weights to hold: method '{self.run.method.name}' trains only a task head",
                              key="retain.ewc")
        cache = ctx.run_dir / FISHER_FILE
        if cache.is_file():
            fisher = load_file(str(cache))
            if sorted(fisher) != sorted(names):
                raise ConfigError(f"{cache} was measured for other weights than this run trains; delete it",
                                  key="retain.ewc")
            ctx.say(f"ewc: Fisher read from {cache}")
        else:
            fisher, how = empirical_fisher(self.objective, ctx.model, self._examples(ctx), names)
            tmp = cache.with_suffix(".tmp")
            save_file({n: t.detach().contiguous().cpu() for n, t in fisher.items()}, str(tmp))
            tmp.replace(cache)
            ctx.say(f"ewc: Fisher of {len(names)} tensors on {min(self.cfg.fisher_samples, len(self.general))} "
                    f"examples of {self.cfg.fisher_data} (per-example gradients by {how})")
        device = self.anchors.anchored[0][1].device
        self.fisher = {n: t.to(device) for n, t in fisher.items()}

    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        return ewc_penalty(self.anchors, self.fisher, self.cfg.lambda_)
