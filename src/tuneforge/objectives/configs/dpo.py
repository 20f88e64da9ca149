"""Configs of the preference objectives on a causal LM: DPO (and IPO/hinge/robust), SimPO, KTO (torch-free)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tuneforge.config.schema import TaskConfig
from tuneforge.objectives.configs.checks import refuse_head_only

__all__ = ["DpoConfig", "KtoConfig", "PreferenceLMConfig", "SimpoConfig"]


class PreferenceLMConfig(TaskConfig):
    """Options every preference objective on a causal LM has."""

    template: Literal["auto", "alpaca", "chatml", "plain"] = Field(
        "auto", description="chat template; auto = the tokenizer's own, else alpaca")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompt tokens kept (cut from the left); default half of data.max_length")
    invalid: Literal["error", "skip"] = Field(
        "error", description="a malformed row (missing field, empty response): error naming file:line, or skip and count")

    def check_run(self, run: Any) -> None:
        refuse_head_only(run, "has none (the LM head is the pretrained output layer)")
        if self.max_prompt_length is not None and self.max_prompt_length >= run.data.max_length:
            raise ValueError(f"task.max_prompt_length ({self.max_prompt_length}) must be below data.max_length "
                             f"({run.data.max_length}), or no response token fits")


class DpoConfig(PreferenceLMConfig):
    """Direct Preference Optimization (Rafailov et al. 2023) and its IPO / hinge / robust variants."""

    name: Literal["dpo"] = "dpo"
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (Azar et al. 2023), hinge (SLiC), robust (Chowdhury et al. 2024)")
    beta: float = Field(0.1, gt=0.0, description="strength of the KL regularisation to the reference (IPO: tau)")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="assumed share of flipped labels (sigmoid: cDPO, robust: rDPO)")

    @model_validator(mode="after")
    def _smoothing(self) -> DpoConfig:
        if self.label_smoothing and self.loss in ("ipo", "hinge"):
            raise ValueError(f"task.label_smoothing applies to the sigmoid and robust losses, not '{self.loss}'")
        return self


class SimpoConfig(PreferenceLMConfig):
    """SimPO (Meng et al. 2024): reference-free, length-normalised log-probs with a target margin."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0.0, description="scale of the per-token average log-prob reward (paper: 2.0-2.5)")
    gamma: float = Field(0.5, ge=0.0, description="target reward margin (the paper's gamma; TRL's simpo_gamma)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed share of flipped labels")


class KtoConfig(PreferenceLMConfig):
    """KTO (Ethayarajh et al. 2024) on unpaired completions labelled desirable or not."""

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0.0, description="strength of the KL regularisation to the reference")
    desirable_weight: float = Field(1.0, gt=0.0, description="loss weight of desirable examples (lambda_D)")
    undesirable_weight: float = Field(1.0, gt=0.0, description="loss weight of undesirable examples (lambda_U)")
