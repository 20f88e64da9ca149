"""Config of bottleneck adapters (see ``layer.py`` for the module and the papers).

Options:

====================  ===========================  ================================================
key                   values (default)             meaning
====================  ===========================  ================================================
``style``             houlsby | pfeiffer           Houlsby et al. 2019: an adapter after the
                      (houlsby)                    attention output and after the FFN output of
                                                   every block; Pfeiffer et al. 2020: after the FFN
                                                   output only (half the parameters)
``bottleneck``        int >= 1 (unset)             adapter width b
``reduction_factor``  float > 0 (16 when neither   b = hidden // reduction_factor; set at most one
                      size is set)                 of ``bottleneck`` / ``reduction_factor``
``non_linearity``     relu | gelu | silu | tanh    activation between down- and up-projection
                      (relu)
``dropout``           0 <= p < 1 (0.0)             dropout on the adapter's input
====================  ===========================  ================================================

Default learning rate 2e-3, measured on MiniLM-L6 (Houlsby, reduction 16 -> b=24) / SST-2, seed 42, bf16,
batch 32, linear schedule with 6% warmup, accuracy on a 1,000-row dev sample (majority 0.551). Two budgets
of ~125 steps: A = 1,000 training rows x 4 epochs (tuning), B = 4,000 rows x 1 epoch (the acceptance run):

=========================  =====  =====
run                        A      B
=========================  =====  =====
adapter, lr 3e-4           0.556
adapter, lr 1e-3           0.836  0.830
adapter, lr 2e-3                  0.838
adapter, lr 3e-3           0.832  0.839
full fine-tuning, lr 5e-5  0.844  0.849
=========================  =====  =====

1e-4 ... 3e-4, common for long schedules, barely leaves the majority class in ~125 steps; 1e-3 ... 3e-3 are
within a point of each other and of full fine-tuning; 2e-3 sits in the middle of that plateau.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tuneforge.config.schema import MethodConfig
from tuneforge.errors import ConfigError

DEFAULT_REDUCTION_FACTOR = 16.0


class AdapterConfig(MethodConfig):
    """Bottleneck adapters in every transformer block; the backbone stays frozen, adapters + head train."""

    name: Literal["adapter"] = "adapter"
    style: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and FFN outputs; pfeiffer: after the FFN output only"
    )
    bottleneck: int | None = Field(None, ge=1, description="adapter width (set this or reduction_factor)")
    reduction_factor: float | None = Field(
        None, gt=0, description="adapter width = hidden size // reduction_factor (default 16)"
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="adapter activation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    default_lr: ClassVar[float] = 2e-3

    @model_validator(mode="after")
    def _one_size(self) -> AdapterConfig:
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError(
                "set method.bottleneck or method.reduction_factor, not both "
                f"(got bottleneck={self.bottleneck}, reduction_factor={self.reduction_factor})"
            )
        return self

    def bottleneck_for(self, hidden: int) -> int:
        """The adapter width for a model of hidden size ``hidden``."""
        if self.bottleneck is not None:
            return self.bottleneck
        factor = self.reduction_factor or DEFAULT_REDUCTION_FACTOR
        width = int(hidden // factor)
        if width < 1:
            raise ConfigError(
                f"hidden size {hidden} // reduction_factor {factor:g} is 0; allowed: reduction_factor <= {hidden}",
                key="method.reduction_factor",
            )
        return width
