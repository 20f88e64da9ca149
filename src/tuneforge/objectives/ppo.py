"""RLHF with PPO and a KL penalty (``task: ppo``; Ziegler et al. 2019, Stiennon et al. 2020, Ouyang et al. 2022).

The policy is the causal LM under the run's method; it trains on its own completions of the prompts in the
``rollout`` loop (`tuneforge.engine.rollout`), which owns sampling, rewards, advantages and the clipped
update. This objective owns what every objective owns: reading and validating the prompts and the reward
source (before any model loads), building the model, tokenizing, evaluation, report samples and loading a
saved run. The reference is the run's model inside the method's reference context (adapters off, no second
copy; `methods._reference`), bound by the loop with `use_reference`.

Evaluation samples one completion per held-out prompt at the training temperature from a fixed seed (the
training RNG is left untouched, so evaluating does not change training) and reports ``reward`` (mean),
``kl`` (mean over completions of the summed k1 = log pi - log ref: nats per completion), ``response_length``
and ``eos_rate`` (share of completions that ended by themselves). A saved run is an ordinary causal LM:
``generate``, ``chat`` and ``merge`` treat it as an SFT run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.splits import train_validation
from tuneforge.errors import ConfigError
from tuneforge.objectives.base import Built, TaskData
from tuneforge.objectives.causal_lm import check_decoder, load_causal_lm, saved_causal_lm
from tuneforge.objectives.configs.ppo import PpoConfig
from tuneforge.objectives.rl_math import kl_estimate
from tuneforge.objectives.rollouts import (
    PromptBatches,
    Prompts,
    encode_prompts,
    read_prompts,
    sample,
    score_tokens,
)
from tuneforge.rewards import RewardFn, check_reward, load_reward

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime
    from tuneforge.methods.base import Reference

__all__ = ["PpoConfig", "RolloutObjective"]


class RolloutObjective:
    """Implements the `Objective` protocol for the rollout tasks (see module docstring); ``grpo`` subclasses it."""

    name = "ppo"
    default_metric = "reward"
    greater_is_better = True
    value_head = True  # PPO learns a value head; GRPO does not

    def __init__(self, run: RunConfig):
        self.run = run
        self.notes: list[str] = []
        self.template: str | None = None
        self.reference: Reference | None = None
        self.reward_fn: RewardFn | None = None
        self._samples: Prompts | None = None
        self.tokenizer: Any = None
        self._encoded: dict[int, tuple[Prompts, PromptBatches]] = {}

    # ----------------------------------------------------------------- data
    def load_data(self, run: RunConfig) -> TaskData:
        check_decoder(run)
        spec = check_reward(run.task)
        self.notes.append(f"reward: {spec.kind} {spec.target}" + (f" (label '{run.task.reward_label}')"
                                                                   if spec.kind == "classification" else ""))
        d = run.data
        if d.train is None:
            raise ConfigError("a file of prompts is required (e.g. data.train=prompts.jsonl)", key="data.train")
        train = read_prompts(run, d.train)
        train, val, notes = train_validation(train, lambda: read_prompts(run, d.validation), d, run.train.seed,
                                             what="prompts")
        self.notes.extend(notes)
        splits: dict[str, Any] = {"train": train, "validation": val}
        if d.test is not None:
            splits["test"] = read_prompts(run, d.test)
        for name, prompts in splits.items():
            prompts.split = name
        self._samples = val
        return TaskData(splits=splits, info={"examples": {k: len(v) for k, v in splits.items()}}, notes=self.notes)

    def read_split(self, path: Path) -> Prompts:
        return read_prompts(self.run, path)

    # ----------------------------------------------------------------- model
    def _use_template(self, tokenizer: Any) -> None:
        if not self.run.task.chat:
            return
        from tuneforge.data.chat import resolve_template

        template, what = resolve_template(tokenizer, "auto")
        if tokenizer.chat_template != template:
            tokenizer.chat_template = template  # saved with the model: chat renders prompts the same way
        self.template = template
        if f"chat template: {what}" not in self.notes:
            self.notes.append(f"chat template: {what}")

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        """The policy's causal LM and the reward source (its model, if any, on the run's device)."""
        from tuneforge.engine.runtime import Runtime

        built = load_causal_lm(run, model_path, packed=False)
        self.tokenizer = built.tokenizer
        self._use_template(built.tokenizer)
        self.bind_reward(Runtime.for_run(run.train))
        return built

    def bind_reward(self, runtime: Runtime) -> None:
        if self.reward_fn is None:
            self.reward_fn = load_reward(self.run.task, runtime=runtime,
                                         batch_size=self.run.train.eval_batch_size or 2 * self.run.train.batch_size)

    def prepare(self, records: Prompts, tokenizer: Any, run: RunConfig) -> PromptBatches:
        self.tokenizer = tokenizer
        if (hit := self._encoded.get(id(records))) is not None and hit[0] is records:
            return hit[1]
        if run.task.chat and self.template is None:
            self._use_template(tokenizer)
        ids, cut = encode_prompts(tokenizer, records, run.task.max_prompt_length, self.template)
        note = f"{records.split or records.source}: {len(records)} prompts"
        if cut:
            note += f", {cut} cut from the left to task.max_prompt_length={run.task.max_prompt_length}"
        if note not in self.notes:
            self.notes.append(note)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        data = PromptBatches(ids, records, pad)
        self._encoded[id(records)] = (records, data)
        return data

    # ----------------------------------------------------------------- reference and reward
    def use_reference(self, reference: Reference) -> None:
        """The method's reference context on the model being trained (made before any update)."""
        self.reference = reference

    @contextmanager
    def reference_model(self, model: nn.Module):
        """The reference module: the bound context, else ``model`` itself (a base model is its own reference)."""
        if self.reference is None:
            yield model
        else:
            with self.reference() as ref:
                yield ref

    def rewards(self, prompts: list[str], completions: list[str]) -> list[float]:
        if self.reward_fn is None:
            raise ConfigError("no reward source is loaded", key="task.reward")
        return self.reward_fn(prompts, completions)

    # ----------------------------------------------------------------- evaluation
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError(f"task '{self.name}' trains in the rollout loop, which scores its own samples")

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"task '{self.name}' computes its losses in the rollout loop (engine.rollout)")

    def evaluate(self, model: nn.Module, data: PromptBatches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        """Seeded samples of every prompt: mean reward, KL to the reference, length, EOS rate (see module docstring)."""
        t = self.run.task
        tokenizer = self.tokenizer
        self.bind_reward(runtime)
        was_training = model.training
        model.eval()
        rewards, kls, lengths, eos = [], [], [], []
        devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.run.train.seed)
                for indices in data.plan(0, batch_size, seed=0, shuffle=False):
                    batch = runtime.to_device(data.collate(indices))
                    texts = [data.prompts.texts[i] for i in indices]
                    with runtime.inference():
                        ro = sample(model, tokenizer, batch, texts, max_new_tokens=t.max_new_tokens,
                                    temperature=t.temperature)
                        logp = score_tokens(model, ro, t.temperature, entropy=False).logps
                        with self.reference_model(model) as ref_model:
                            ref = score_tokens(ref_model, ro, t.temperature, entropy=False).logps
                    mask = ro.response_mask.float()
                    kls.append((kl_estimate(logp, ref, "k1") * mask).sum(1).cpu())
                    lengths.append(mask.sum(1).cpu())
                    eos.append(ro.ended.float().cpu())
                    rewards.extend(self.rewards(ro.prompts, ro.completions))
        finally:
            model.train(was_training)
        length = torch.cat(lengths)
        ended = torch.cat(eos)
        return {"reward": float(np.mean(rewards)), "kl": float(torch.cat(kls).mean()),
                "response_length": float(length.mean()), "eos_rate": float(ended.mean()), "examples": len(data)}

    def baseline_metrics(self, train: Any, records: Any) -> dict[str, float]:
        """None: the reward of the untrained policy is the baseline (``train.eval_on_start``)."""
        return {}

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the HF folder (a causal LM, as an SFT run's)."""

    def report_samples(self, model: nn.Module, tokenizer: Any) -> list[dict[str, Any]]:
        """Greedy continuations of three held-out prompts."""
        from tuneforge.generation import GenerationOptions, generate

        self.tokenizer = tokenizer
        if self._samples is None:
            return []
        picked = self._samples.subset(range(min(3, len(self._samples))))
        prompts = picked.messages if picked.messages is not None else picked.texts
        replies = generate(model, tokenizer, prompts, GenerationOptions(max_new_tokens=self.run.task.max_new_tokens),
                           chat=self.run.task.chat)
        return [{"prompt": p, "generation": g} for p, g in zip(picked.texts, replies, strict=True)]

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        """The trained policy; the run's base model becomes the reference of ``tuneforge eval``."""
        from tuneforge.engine.runtime import Runtime
        from tuneforge.models.registry import resolve_model

        built = saved_causal_lm(model_dir)
        self.tokenizer = built.tokenizer
        self._use_template(built.tokenizer)
        if self.reference is None:
            runtime = Runtime.for_run(self.run.train)
            base = runtime.move(load_causal_lm(self.run, resolve_model(self.run.model.name), packed=False).model).eval()

            @contextmanager
            def reference():
                yield base

            self.reference = reference
        return built


class PpoObjective(RolloutObjective):
    """``task: ppo``: a value head, GAE and the KL penalty in the reward (see `engine.rollout`)."""

    name = "ppo"


OBJECTIVE = PpoObjective
