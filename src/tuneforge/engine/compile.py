"""``train.compile``: torch.compile as a measured option, off by default.

``blocks`` compiles each repeated transformer block in place (regional compilation: every block has the same
code, so one compiled graph serves all of them; the first step pays the compile, 26 s for a 2-layer GPT-2 on 2 CPU
cores, and again for each new input shape); ``model`` compiles the whole model in place. ``nn.Module.compile`` keeps
parameter names, so checkpoints, saving and merging see the same model. Shapes: packed and length-grouped
batches vary in length, so the first recompile marks the sequence dimension dynamic (torch's default).

Measured on the benchmarks' CPU (2 cores, `benchmarks/README.md`) it is not a default: on the tiny-GPT-2
pretraining benchmark the compile took ~26 s and the compiled step was no faster (52 vs 48 ms), so 150 steps
took 33.6 s instead of 7.5 s and 600 steps 57.1 s instead of 28.9 s; issue 16 found no gain for MiniLM
either. On a GPU, where fusing elementwise kernels saves launches, it is worth measuring.
"""

from __future__ import annotations

from torch import nn

from tuneforge.errors import ConfigError

__all__ = ["apply_compile", "repeated_blocks"]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the members of every outermost ``nn.ModuleList`` whose members
    all share one class name (BERT ``encoder.layer``, Llama ``model.layers``, T5 ``encoder.block`` and
    ``decoder.block``; by name, so a block given another forward in place, as `objectives.first_token` does to
    the last one, still counts)."""
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(b).__name__ for b in m}) == 1]
    outer = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o != n)]
    return [block for _, blocks in outer for block in blocks]


def apply_compile(model: nn.Module, how: str) -> int:
    """Compile ``model`` in place as ``train.compile`` says (``blocks`` | ``model``); how many modules."""
    if how == "model":
        model.compile()
        return 1
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no list of repeated blocks to compile; use "
                          "train.compile=model", key="train.compile")
    for block in blocks:
        block.compile()
    return len(blocks)
