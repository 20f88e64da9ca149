"""Config of full fine-tuning (no options beyond the shared ones)."""

from __future__ import annotations

from typing import ClassVar, Literal

from tuneforge.config.schema import MethodConfig


class FullConfig(MethodConfig):
    """Every parameter trains; the pretrained-model default learning rate is 5e-5."""

    name: Literal["full"] = "full"
    default_lr: ClassVar[float] = 5e-5
    from_scratch: ClassVar[bool] = True
