"""Reference contexts shared by the methods (``MethodRuntime.reference``, see `methods.base`).

``runtime.reference(model)`` is called once, right after ``apply`` and before training; each call of the
returned `Reference` opens a context whose value computes as the model did *before training*: the
untouched base, with the task head as it was when the method was applied. Three ways, cheapest first:

* `hooks_reference`: the method can switch itself off (peft ``disable_adapter``, our adapter hooks); only
  the weights that train in place (a task head) are snapshotted and swapped;
* `swap_reference`: the method trains some of the model's own tensors (BitFit's biases, a head):
  snapshot them now, swap the snapshot in inside the context, put the trained values back on exit;
* `copy_reference`: the method may change any weight (full, partial): a frozen deep copy made now.

Inside every context the module is in eval mode (no dropout: a reference is deterministic); the live
model's train/eval flags and ``requires_grad`` flags are restored on exit, even on exceptions. Swaps write
through ``param.data`` so autograd's version counters do not move: a policy forward whose graph is still
pending (DPO computes policy, then reference log-probs, then backward) keeps a valid graph, and the
values it saved are bit-identical again when the context exits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import nn

from tuneforge.methods.base import Reference

__all__ = ["copy_reference", "eval_mode", "hooks_reference", "snapshot", "swap_reference", "swapped"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; every submodule's own train/eval flag is restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def _keep_requires_grad(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, rg in flags:
            if p.requires_grad != rg:
                p.requires_grad_(rg)


def snapshot(model: nn.Module, keep: Callable[[str, nn.Parameter], bool] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters ``keep(name, p)`` selects (default: those that require grad)."""
    keep = keep or (lambda name, p: p.requires_grad)
    with torch.no_grad():
        return {n: p.detach().clone() for n, p in model.named_parameters() if keep(n, p)}


@contextmanager
def swapped(model: nn.Module, saved: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``saved`` values in ``model``'s parameters inside the context; the current values back on exit."""
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise ValueError(f"the reference snapshot names parameters this model no longer has: {missing[:5]}")
    current: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, value in saved.items():
                data = params[name].data  # .data: no autograd version bump (see module docstring)
                current[name] = data.clone()
                data.copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in current.items():
                params[name].data.copy_(value)


def swap_reference(model: nn.Module, keep: Callable[[str, nn.Parameter], bool] | None = None) -> Reference:
    """Snapshot the parameters ``keep`` selects (default: the trainable ones) now; each context swaps them in."""
    saved = snapshot(model, keep)

    @contextmanager
    def reference() -> Iterator[nn.Module]:
        with swapped(model, saved), eval_mode(model):
            yield model

    return reference


def hooks_reference(model: nn.Module, disable: Callable[[nn.Module], AbstractContextManager],
                    keep: Callable[[str, nn.Parameter], bool] | None = None) -> Reference:
    """The method's own off switch (``disable(model)``, a context) plus a swap of the parameters ``keep``
    selects (snapshotted now; none when ``keep`` is None): for methods whose head trains in place."""
    saved = snapshot(model, keep) if keep is not None else {}

    @contextmanager
    def reference() -> Iterator[nn.Module]:
        with ExitStack() as stack:
            stack.enter_context(_keep_requires_grad(model))
            stack.enter_context(swapped(model, saved))
            stack.enter_context(eval_mode(model))
            stack.enter_context(disable(model))
            yield model

    return reference


def copy_reference(model: nn.Module) -> Reference:
    """A frozen deep copy of ``model`` made now (eval mode, no grad); follows the model to its device."""
    frozen = copy.deepcopy(model).requires_grad_(False).eval()

    @contextmanager
    def reference() -> Iterator[nn.Module]:
        device = next((p.device for p in model.parameters()), None)
        if device is not None and next(frozen.parameters()).device != device:
            frozen.to(device)
        yield frozen

    return reference
