"""SIGKILL and resume for the alignment objectives: DPO (reference log-probs recomputed from the freshly loaded base
model, not from the resumed policy) and PPO (value head, KL controller, sampling RNG and the prompt plan restored at
an iteration boundary). The resumed run must end with the weights (1e-6) of the same run done in one go.

Marked slow (six CLI runs, ~100 s on the shared 2-core machine); the default suite keeps the in-process
interrupt-and-resume tests of both (tests/unit/test_dpo.py, tests/unit/test_ppo.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _common import REPO, cli
from test_resume import kill_when_past_checkpoint, max_abs_diff

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_preference_data import synthetic_pairs, write_jsonl  # noqa: E402

MAX_STEPS = {"dpo": 30, "ppo": 24}
KILL_AFTER = {"dpo": 10, "ppo": 8}

REWARD = '''def vowel_start(prompts, completions):
    out = []
    for c in completions:
        letters = [ch for ch in c if ch.isalpha()]
        out.append(1.0 if letters and letters[0] in "aeiou" else 0.0)
    return out
'''


def _args(case: str, run: Path) -> list[str]:
    common = ["model=tiny-llama", f"output_dir={run}", f"train.max_steps={MAX_STEPS[case]}", "train.save_steps=2",
              "train.log_steps=1", "train.precision=fp32", "train.tensorboard=false", "train.schedule=linear",
              "train.warmup_steps=2"]
    if case == "dpo":
        return ["train", "task=dpo", "method=full", "data.train=pairs.jsonl", "data.validation=pairs-val.jsonl",
                "data.max_length=48", "task.template=chatml", "train.batch_size=4", "train.lr=3e-3",
                "train.eval_steps=15", *common]
    return ["train", "task=ppo", "task.reward=alignment_reward:vowel_start", "method=full", "data.train=prompts.jsonl",
            "task.max_new_tokens=6", "task.mini_batch_size=4", "task.adaptive_kl=true", "task.kl_horizon=50",
            "train.batch_size=8", "train.lr=5e-3", "train.eval_steps=12", *common]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resume-alignment")
    write_jsonl(d / "pairs.jsonl", synthetic_pairs(64, seed=0))
    write_jsonl(d / "pairs-val.jsonl", synthetic_pairs(8, seed=1))
    openings = ["the movie was", "i think that", "a story of", "when the", "she said", "it is a", "we saw the"]
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in openings * 6) + "\n", encoding="utf-8")
    (d / "alignment_reward.py").write_text(REWARD, encoding="utf-8")
    return d


@pytest.mark.parametrize("case", ["dpo", "ppo"])
def test_killed_run_resumes_to_the_same_weights(case: str, workdir: Path) -> None:
    resumed, reference = workdir / f"resumed-{case}", workdir / f"reference-{case}"
    step = kill_when_past_checkpoint(_args(case, resumed), resumed, workdir, f"killed-{case}.log", KILL_AFTER[case])
    assert step < MAX_STEPS[case]
    out = cli(*_args(case, resumed), "--resume", cwd=workdir)
    assert f"resumed from step {step} of {MAX_STEPS[case]}" in out.stdout
    cli(*_args(case, reference), cwd=workdir)
    last = reference / "checkpoints" / f"step-{MAX_STEPS[case]:08d}"
    again = resumed / "checkpoints" / f"step-{MAX_STEPS[case]:08d}"
    assert max_abs_diff(again / "trainable.safetensors", last / "trainable.safetensors") <= 1e-6
    got = json.loads((resumed / "metrics.json").read_text(encoding="utf-8"))["eval"]
    ref = json.loads((reference / "metrics.json").read_text(encoding="utf-8"))["eval"]
    assert got == pytest.approx(ref, abs=1e-6)
    if case == "ppo":
        a, b = (torch.load(p / "extra.pt", weights_only=False)["extensions"]["rollout"] for p in (again, last))
        assert float((a["value_head"]["weight"] - b["value_head"]["weight"]).abs().max()) <= 1e-6
        assert a["kl_controller"]["value"] == pytest.approx(b["kl_controller"]["value"], abs=1e-12)
        assert a["kl_controller"]["value"] != 0.05  # the adaptive controller moved (its state matters)
