"""Configs of the built-in extensions (torch-free, so recipes validate fast)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field

from tuneforge.config.schema import ExtensionConfig

__all__ = ["DistillConfig", "EWCConfig", "ForgettingConfig", "L2SPConfig", "ReplayConfig", "SamplesConfig"]


class ForgettingConfig(ExtensionConfig):
    """The forgetting report. ``task.general_eval`` (the historical key) and ``general_eval`` here are the same
    setting; the report runs when either names a file."""

    name: Literal["forgetting"] = "forgetting"
    general_eval: Path | None = Field(None, description="held-out general-text file (same layout as the training data)")
    general_recipe: Path | None = Field(
        None, description="measure general ability with another task: a recipe whose objective scores the "
                          "trained model's backbone (no task head) on general_eval, or on its own data.validation "
                          "(e.g. an STS contrastive recipe: sentence-embedding Spearman for a classifier)")


class SamplesConfig(ExtensionConfig):
    """Before/after generations in report.md for generative objectives (on by default for them)."""

    name: Literal["samples"] = "samples"
    enabled: bool = Field(True, description="false: skip the generations (saves a little time)")


class L2SPConfig(ExtensionConfig):
    """L2-SP (Li et al. 2018): ``alpha/2 ||w - w0||^2`` pulls every trainable weight toward its starting value
    (the pretrained weight; a method's own initial value for the weights it adds), ``beta/2 ||w||^2`` decays
    the new task head."""

    name: Literal["l2sp"] = "l2sp"
    retain: ClassVar[bool] = True
    alpha: float = Field(0.01, ge=0, description="pull toward the starting weights")
    beta: float = Field(0.0, ge=0, description="plain L2 on the task head's weights")


class EWCConfig(ExtensionConfig):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): ``lambda/2 sum_i F_i (w_i - w0_i)^2`` with F the
    diagonal empirical Fisher of the objective's loss on general data (mean of squared per-sample gradients)."""

    model_config = ConfigDict(**ExtensionConfig.model_config, populate_by_name=True)

    name: Literal["ewc"] = "ewc"
    retain: ClassVar[bool] = True
    lambda_: float = Field(100.0, ge=0, alias="lambda", description="strength of the pull (retain.ewc.lambda=...)")
    fisher_data: Path = Field(description="general data the Fisher is measured on (the training data's layout)")
    fisher_samples: int = Field(256, ge=1, description="examples of fisher_data used (a seeded sample)")


class DistillConfig(ExtensionConfig):
    """Knowledge distillation (Hinton et al. 2015): ``weight * T^2 * KL(softmax(t/T) || softmax(s/T))`` added to
    the task loss, from a teacher's logits on the same batch (the objective's scored positions only)."""

    name: Literal["distill"] = "distill"
    retain: ClassVar[bool] = True
    teacher: Path | None = Field(None, description="a run directory or model folder; default: the starting model "
                                 "itself, through the method's reference (adapters off; a frozen copy for full)")
    temperature: float = Field(2.0, gt=0, description="softening temperature T")
    weight: float = Field(0.5, ge=0, description="factor of the distillation term")


class ReplayConfig(ExtensionConfig):
    """Replay: ``ratio`` of the training batches drawn from general data (see `tuneforge.data.replay`)."""

    name: Literal["replay"] = "replay"
    retain: ClassVar[bool] = True
    data: Path = Field(description="general data in the training data's layout (retain.replay.data=FILE)")
    ratio: float = Field(0.25, gt=0, lt=1, description="share of the training batches drawn from it")
