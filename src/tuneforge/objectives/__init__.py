"""Training objectives, one module each, registered by one line below (see `objectives.base`).

Importing this package imports only the torch-free config classes; an objective's module (and torch)
loads when a run creates it. Each line declares what the objective can do (`ObjectiveSpec`).
"""

from __future__ import annotations

from tuneforge.objectives.base import (
    OBJECTIVES,
    Built,
    Objective,
    ObjectiveSpec,
    TaskData,
    get_objective,
    get_spec,
    register,
)
from tuneforge.objectives.configs.classification import ClassificationConfig
from tuneforge.objectives.configs.clm import ClmConfig
from tuneforge.objectives.configs.contrastive import ContrastiveConfig
from tuneforge.objectives.configs.dpo import DpoConfig, KtoConfig, SimpoConfig
from tuneforge.objectives.configs.extractive_qa import ExtractiveQAConfig
from tuneforge.objectives.configs.mlm import MLMConfig
from tuneforge.objectives.configs.multitask import MultiTaskConfig
from tuneforge.objectives.configs.ppo import GrpoConfig, PpoConfig
from tuneforge.objectives.configs.reward import RewardConfig
from tuneforge.objectives.configs.seq2seq import Seq2SeqConfig
from tuneforge.objectives.configs.sft import SftConfig
from tuneforge.objectives.configs.span_corruption import SpanCorruptionConfig
from tuneforge.objectives.configs.token_classification import TokenClassificationConfig

_LM = {"generative": True, "model_class": "AutoModelForCausalLM", "pretrained_head": True,
       "evaluates_base_models": True}

register(ObjectiveSpec("classification", ClassificationConfig, "tuneforge.objectives.classification",
                       model_class="AutoModelForSequenceClassification", predicts=True, feature_head=True, task_head=True,
                       serve_route="classify"))
register(ObjectiveSpec("clm", ClmConfig, "tuneforge.objectives.clm", **_LM))
register(ObjectiveSpec("sft", SftConfig, "tuneforge.objectives.sft", chat=True, **_LM))
register(ObjectiveSpec("mlm", MLMConfig, "tuneforge.objectives.mlm", model_class="AutoModelForMaskedLM"))
register(ObjectiveSpec("span_corruption", SpanCorruptionConfig, "tuneforge.objectives.span_corruption",
                       model_class="T5ForConditionalGeneration"))
register(ObjectiveSpec("token_classification", TokenClassificationConfig, "tuneforge.objectives.token_classification",
                       model_class="AutoModelForTokenClassification", predicts=True, task_head=True, serve_route="tag"))
register(ObjectiveSpec("extractive_qa", ExtractiveQAConfig, "tuneforge.objectives.extractive_qa",
                       model_class="AutoModelForQuestionAnswering", predicts=True, task_head=True, metric_scale=100.0,
                       serve_route="answer"))
register(ObjectiveSpec("seq2seq", Seq2SeqConfig, "tuneforge.objectives.seq2seq", model_class="AutoModelForSeq2SeqLM",
                       predicts=True, final_eval=True))
register(ObjectiveSpec("contrastive", ContrastiveConfig, "tuneforge.objectives.contrastive", model_class="AutoModel",
                       embeds=True))
register(ObjectiveSpec("multitask", MultiTaskConfig, "tuneforge.objectives.multitask",
                       model_class="tuneforge.models.multitask:MultiTaskModel", predicts=True))
register(ObjectiveSpec("reward", RewardConfig, "tuneforge.objectives.reward",
                       model_class="AutoModelForSequenceClassification", predicts=True))
register(ObjectiveSpec("dpo", DpoConfig, "tuneforge.objectives.dpo", chat=True, **_LM))
register(ObjectiveSpec("simpo", SimpoConfig, "tuneforge.objectives.simpo", chat=True, **_LM))
register(ObjectiveSpec("kto", KtoConfig, "tuneforge.objectives.kto", chat=True, **_LM))
register(ObjectiveSpec("ppo", PpoConfig, "tuneforge.objectives.ppo", loop="rollout", **_LM))
register(ObjectiveSpec("grpo", GrpoConfig, "tuneforge.objectives.grpo", loop="rollout", **_LM))

__all__ = ["OBJECTIVES", "Built", "Objective", "ObjectiveSpec", "TaskData", "get_objective", "get_spec", "register"]
