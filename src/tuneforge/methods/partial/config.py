"""Config of partial fine-tuning."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tuneforge.config.schema import MethodConfig
from tuneforge.errors import ConfigError


class PartialConfig(MethodConfig):
    """Freeze embeddings (optionally) and the bottom ``freeze_layers`` blocks; the rest trains."""

    name: Literal["partial"] = "partial"
    freeze_layers: int = Field(2, ge=0, description="number of bottom transformer layers to freeze")
    freeze_embeddings: bool = Field(True, description="freeze the embedding tables too")
    default_lr: ClassVar[float] = 5e-5
    from_scratch: ClassVar[bool] = True

    def check_model(self, n_layers: int) -> None:
        if self.freeze_layers > n_layers:
            raise ConfigError(f"the model has {n_layers} layers; allowed 0..{n_layers}", key="method.freeze_layers")
