"""Bottleneck adapters attached to any Hugging Face transformer from outside, with forward hooks.

An adapter is a small residual MLP on a hidden state ``h`` (Houlsby et al. 2019, "Parameter-Efficient
Transfer Learning for NLP", ICML; https://arxiv.org/abs/1902.00751)::

    adapter(h) = h + up(act(down(dropout(h))))      down: hidden -> b, up: b -> hidden (both with bias)

``up`` starts at zero, so a freshly adapted model computes exactly what the base model computes; ``down``
keeps PyTorch's default ``nn.Linear`` weight init (as LoRA's A matrix and He et al. 2022's "MAM adapter") with
a zero bias, so the first gradients of ``up`` are informative. Placement:

* ``houlsby``: after the attention output projection and after the FFN output projection of every block,
  before the residual add and layer norm (Houlsby et al. 2019, Fig. 2);
* ``pfeiffer``: after the FFN output projection only (Pfeiffer et al. 2020, "AdapterFusion",
  https://arxiv.org/abs/2005.00247; half the parameters, about the same accuracy).

Why our own code: peft has no bottleneck adapters (huggingface/peft#244 asks for them; it has LoRA, IA3,
prompts...), and AdapterHub's ``adapters`` package pins transformers 4.x while tuneforge runs on 5.x.

How it wraps without editing model code: a forward hook on each projection module replaces its output
by ``adapter(output)``. The adapters live in an `AdapterSet` registered as the submodule
``bottleneck_adapters`` of ``model.base_model``, whose module tree mirrors the block list's path, e.g.
``bert.bottleneck_adapters.encoder.layer.3.ffn.up.weight``. So the adapters move, save and load with the
model, checkpoint names are stable, and `models.anatomy.param_depth` places them at their block's depth
(layer-wise LR decay works unchanged).

Where the projections are looked for (relative to each block of the outermost ``ModuleList`` named
``layer``/``layers``/``h``/``block``/``blocks``) is `SITES`; an architecture whose blocks match none of
them is refused with the list of what was searched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tuneforge.errors import ConfigError

__all__ = ["ATTR", "SITES", "AdapterSet", "BottleneckAdapter", "adapter_set", "attach", "detach", "find_sites"]

ATTR = "bottleneck_adapters"
_BLOCK_LISTS = ("layer", "layers", "h", "block", "blocks")

# (architectures, attention-output candidates, FFN-output candidates), paths relative to one block; the
# first existing candidate is used. T5 decoder blocks have cross-attention at layer.1 and the FFN at layer.2.
SITES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("BERT, RoBERTa, ELECTRA, MiniLM", ("attention.output.dense",), ("output.dense",)),
    ("Llama, Mistral, Qwen2, Gemma", ("self_attn.o_proj",), ("mlp.down_proj",)),
    ("GPT-2", ("attn.c_proj",), ("mlp.c_proj",)),
    ("T5", ("layer.0.SelfAttention.o",), ("layer.2.DenseReluDense.wo", "layer.1.DenseReluDense.wo")),
    ("DistilBERT", ("attention.out_lin",), ("ffn.lin2",)),
)

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(dropout(h))))``; 2*hidden*b + hidden + b parameters; identity at init."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str = "relu", dropout: float = 0.0,
                 *, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.enabled = True  # False: its hook passes the hooked output through unchanged
        if non_linearity not in _ACTIVATIONS:
            raise ConfigError(f"unknown non_linearity '{non_linearity}'; allowed: {', '.join(_ACTIVATIONS)}",
                              key="method.non_linearity")
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., hidden]
        return h + self.up(self.act(self.down(self.dropout(h))))


class _AdapterHook:
    """Forward hook replacing a projection's output by ``adapter(output)``.

    A callable object rather than a closure so that ``copy.deepcopy(model)`` rebinds it to the copied
    adapter (deepcopy shares plain functions but copies objects through its memo).
    """

    def __init__(self, adapter: BottleneckAdapter):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.adapter.enabled:  # switched off (`AdapterSet.disabled`): the base projection's output
            return output
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"adapter hook expects a tensor output from {type(module).__name__}")
        return self.adapter(output)


@dataclass(frozen=True)
class Site:
    """One place an adapter goes: its name in the AdapterSet and the hooked module's name (in base)."""

    adapter: str  # e.g. "encoder.layer.0.attn"
    module: str  # e.g. "encoder.layer.0.attention.output.dense"


class AdapterSet(nn.Module):
    """The adapters of one model, as a module tree mirroring the block lists; knows where each is hooked."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[str, str] = {}  # adapter name -> hooked module name, relative to base_model
        self._handles: list = []

    def adapters(self) -> Iterator[tuple[str, BottleneckAdapter]]:
        for name, module in self.named_modules():
            if isinstance(module, BottleneckAdapter):
                yield name, module

    @contextmanager
    def disabled(self) -> Iterator[AdapterSet]:
        """Every adapter switched off inside the context (the hooked modules compute as the base);
        each adapter's previous switch is restored on exit."""
        before = [(a, a.enabled) for _, a in self.adapters()]
        try:
            for a, _ in before:
                a.enabled = False
            yield self
        finally:
            for a, flag in before:
                a.enabled = flag


def _outermost_block_lists(base: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = [(n, m) for n, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in _BLOCK_LISTS and len(m) > 0]
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]


def _first(block: nn.Module, candidates: tuple[str, ...]) -> str | None:
    names = dict(block.named_modules())
    return next((c for c in candidates if c in names), None)


def find_sites(base: nn.Module, style: str) -> list[Site]:
    """Where adapters go in ``base`` (a transformers base model) for ``style``; ConfigError if nowhere."""
    lists = _outermost_block_lists(base)
    searched = "; ".join(f"{arch}: {'|'.join(a)} and {'|'.join(f)}" for arch, a, f in SITES)
    if not lists:
        raise ConfigError(
            f"method 'adapter' cannot find the transformer blocks of {type(base).__name__}: no ModuleList named "
            f"{'/'.join(_BLOCK_LISTS)}", key="method")
    sites: list[Site] = []
    for list_name, blocks in lists:
        for i, block in enumerate(blocks):
            prefix = f"{list_name}.{i}"
            for _, attn_paths, ffn_paths in SITES:
                ffn = _first(block, ffn_paths)
                attn = _first(block, attn_paths)
                if ffn is None or (style == "houlsby" and attn is None):
                    continue
                if style == "houlsby":
                    sites.append(Site(f"{prefix}.attn", f"{prefix}.{attn}"))
                sites.append(Site(f"{prefix}.ffn", f"{prefix}.{ffn}"))
                break
            else:
                raise ConfigError(
                    f"method 'adapter' does not know where the attention/FFN output projections of "
                    f"{type(block).__name__} ({type(base).__name__}.{prefix}) are; searched: {searched}",
                    key="method")
    return sites


def _out_features(module: nn.Module, name: str) -> int:
    for attr in ("out_features", "nf"):  # nn.Linear, transformers' GPT-2 Conv1D
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot tell the output size of {name} ({type(module).__name__}) for an adapter",
                      key="method")


def _container(root: nn.Module, path: str) -> nn.Module:
    """The nested ModuleDict/ModuleList at ``path`` under ``root``, created on the way."""
    node = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if part not in node._modules:
            child: nn.Module = nn.ModuleList() if nxt is not None and nxt.isdigit() else nn.ModuleDict()
            if isinstance(node, nn.ModuleList):
                assert int(part) == len(node), "blocks are visited in order"
                node.append(child)
            else:
                node.add_module(part, child)
        node = node._modules[part]
    return node


def attach(model: nn.Module, *, style: str, bottleneck_for, non_linearity: str, dropout: float) -> AdapterSet:
    """Add adapters to ``model`` (hooks + the ``bottleneck_adapters`` submodule of its base model).

    ``bottleneck_for(hidden) -> b`` gives the adapter width. New adapter parameters require grad; nothing
    else is touched. Returns the `AdapterSet`.
    """
    base = model.base_model
    if ATTR in base._modules:
        raise ValueError(f"{type(model).__name__} already has bottleneck adapters")
    modules = dict(base.named_modules())
    aset = AdapterSet()
    for site in find_sites(base, style):
        target = modules[site.module]
        weight = next(target.parameters())
        hidden = _out_features(target, site.module)
        adapter = BottleneckAdapter(hidden, bottleneck_for(hidden), non_linearity, dropout,
                                    dtype=weight.dtype, device=weight.device)
        parent, leaf = site.adapter.rsplit(".", 1)
        _container(aset, parent).add_module(leaf, adapter)
        aset.sites[site.adapter] = site.module
        aset._handles.append(target.register_forward_hook(_AdapterHook(adapter)))
    base.add_module(ATTR, aset)
    return aset


def adapter_set(model: nn.Module) -> AdapterSet | None:
    """The model's `AdapterSet`, or None."""
    return model.base_model._modules.get(ATTR)


def detach(model: nn.Module) -> nn.Module:
    """Remove the adapters and their hooks: the model is the base model again (weights untouched)."""
    aset = adapter_set(model)
    if aset is not None:
        for handle in aset._handles:
            handle.remove()
        del model.base_model._modules[ATTR]
    return model
