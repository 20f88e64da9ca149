"""PPO and GRPO (``task: ppo`` / ``grpo``, the rollout loop) on tiny-llama: sampling and scoring agree, PPO raises
the reward of a toy bandit-like task with bounded KL, GRPO with LoRA (its reference: adapters off), exact resume,
and bad reward sources refused with the key they came from."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import interrupt_after_checkpoint
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.objectives import get_objective
from tuneforge.pipeline import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from _common import cli

OPENINGS = ["the movie was", "i think that", "a story of", "when the", "she said", "it is a", "we saw the", "my friend"]


# ---------------------------------------------------------------- reward functions (task.reward=test_ppo:NAME)
def vowel_start(prompts: list[str], completions: list[str]) -> list[float]:
    """1 when the completion's first letter is a vowel: a bandit over the first token."""
    out = []
    for c in completions:
        letters = [ch for ch in c if ch.isalpha()]
        out.append(1.0 if letters and letters[0] in "aeiou" else 0.0)
    return out


def raises(prompts: list[str], completions: list[str]) -> list[float]:
    raise RuntimeError("the scorer is down")


def not_a_number(prompts: list[str], completions: list[str]) -> list:
    return ["good"] * len(completions)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ppo-data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in OPENINGS * 8) + "\n", encoding="utf-8")
    return path


def overrides(data: Path, out: Path, *extra: str, task: str = "ppo") -> list[str]:
    return ["model=tiny-llama", f"task={task}", "task.reward=test_ppo:vowel_start", f"data.train={data}",
            "task.max_new_tokens=1", "train.batch_size=16", "train.lr=1e-2", "train.schedule=constant",
            "train.warmup_steps=0", "train.precision=fp32", "train.tensorboard=false", "train.seed=0",
            f"output_dir={out}", *extra]


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x]
    return [r for r in rows if r["split"] == "train"]


def test_sampling_and_scoring_use_the_same_distribution(prompts: Path, tmp_path: Path) -> None:
    """The processed scores generate sampled from equal log_softmax(logits / T) as scored (trl#235): even when the
    model's own generation_config asks for top-k and a repetition penalty, the rollout turns them off."""
    from tuneforge.objectives.rollouts import generation_config, sample, score_tokens

    run = load_config(None, overrides(prompts, tmp_path / "x", "task.max_new_tokens=6"))
    objective = get_objective(run)
    data = objective.load_data(run)
    built = objective.build(run, _model_path(run), data)
    model, tok = built.model.eval(), built.tokenizer
    model.generation_config.top_k, model.generation_config.repetition_penalty = 5, 1.3
    batches = objective.prepare(data.splits["train"], tok, run)
    batch = batches.collate(list(range(6)))
    torch.manual_seed(1)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_scores=True,
                         return_dict_in_generate=True, generation_config=generation_config(tok, model, 6, 0.7))
    sampled = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # [B, R, V]
    torch.manual_seed(1)
    ro = sample(model, tok, batch, ["p"] * 6, max_new_tokens=6, temperature=0.7)
    assert torch.equal(ro.input_ids, out.sequences)  # same seed, same samples
    with torch.no_grad():
        scored = score_tokens(model, ro, 0.7).logps
    resp = ro.input_ids[:, ro.prompt_length:]
    expected = sampled.gather(-1, resp[..., None]).squeeze(-1) * ro.response_mask
    assert torch.isfinite(expected).all()
    assert torch.allclose(scored, expected, atol=1e-4)
    assert ro.response_mask[:, 0].all()


def _model_path(run):
    from tuneforge.models import resolve_model

    return resolve_model(run.model.name)


def test_ppo_raises_the_reward_with_the_kl_held_by_the_controller(prompts: Path, tmp_path: Path) -> None:
    """A one-token bandit (reward 1 for a vowel first letter, ~1/4 of the untrained samples). With a KL penalty
    beta the KL-regularised optimum is pi ~ ref * exp(r / beta), whose KL is
    E_pi[r] / beta - log(p e^(1/beta) + 1 - p) = 1.27 nats for p = 1/4, beta = 0.2."""
    res = train(load_config(None, overrides(prompts, tmp_path / "run", "train.max_steps=30", "task.adaptive_kl=true",
                                            "task.kl_coef=0.2", "task.target_kl=1.0", "task.kl_horizon=100",
                                            "train.eval_steps=30")), quiet=True)
    rows = _train_rows(res.run_dir)
    assert len(rows) == 30
    assert rows[0]["kl"] == 0.0  # step 1 samples from the untrained policy = the reference
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    # bounded: below a deterministic policy's ln(1024) = 6.9 nats (PPO overshoots the regularised optimum on
    # 16 samples an iteration, and the controller pulls it back: the last iterations sit at 2-4 nats)
    assert max(r["kl"] for r in rows) < 5.0
    # the loop's beta follows Ziegler et al.'s update from each iteration's KL and completions (horizon 100)
    for prev, cur in itertools.pairwise(rows):
        error = min(max(prev["kl"] / 1.0 - 1.0, -0.2), 0.2)
        assert cur["kl_coef"] == pytest.approx(prev["kl_coef"] * (1 + error * prev["completions"] / 100), rel=1e-9)
    for key in ("entropy", "clip_frac", "value_loss", "policy_loss", "response_length"):
        assert all(key in r for r in rows)
    assert (res.run_dir / "plots" / "rollout.png").stat().st_size > 10_000  # reward and KL per iteration
    m = res.metrics["splits"]["validation"]
    assert set(m) >= {"reward", "kl", "response_length", "eos_rate"} and m["reward"] > first


def test_grpo_raises_the_reward_without_a_value_head(prompts: Path, tmp_path: Path) -> None:
    res = train(load_config(None, overrides(prompts, tmp_path / "run", "task.group_size=4", "train.batch_size=4",
                                            "train.max_steps=24", "task.ppo_epochs=2", task="grpo")), quiet=True)
    rows = _train_rows(res.run_dir)
    assert rows[0]["kl"] == 0.0 and "value_loss" not in rows[0] and rows[0]["completions"] == 16
    first = sum(r["reward"] for r in rows[:4]) / 4
    last = sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.3, (first, last)
    assert max(r["kl"] for r in rows) < 5.0


def test_ppo_with_lora_uses_adapters_off_as_reference_and_its_run_generates_and_merges(prompts: Path,
                                                                                       tmp_path: Path) -> None:
    res = train(load_config(None, overrides(prompts, tmp_path / "run", "method=lora", "train.max_steps=3",
                                            "train.lr=5e-2", "task.max_new_tokens=4")), quiet=True)
    rows = _train_rows(res.run_dir)
    assert rows[0]["kl"] == 0.0  # LoRA's reference context (adapters off) is the untrained policy
    assert rows[-1]["kl"] != 0.0  # and the policy has moved away from it
    # a PPO run is a causal-LM run as an SFT run is: generate (raw-text continuation) and merge take it
    from tuneforge.export import merge_run
    from tuneforge.generation import GenerationOptions, generate, load_model

    loaded = load_model(res.run_dir, device="cpu")
    assert loaded.chat is False
    out = generate(loaded.model, loaded.tokenizer, ["the movie was"], GenerationOptions(max_new_tokens=3), chat=False)
    assert len(out) == 1 and isinstance(out[0], str)
    merged = merge_run(res.run_dir, tmp_path / "merged")
    assert merged.kind == "merged" and merged.max_abs_diff < 1e-4
    # `tuneforge eval RUN --data PROMPTS`: the reference is the base model named in the run's config
    from tuneforge.inference import evaluate_file

    again = evaluate_file(res.run_dir, prompts, [])
    assert set(again) >= {"reward", "kl", "response_length", "eos_rate"} and again["examples"] == 64


def test_resume_after_an_interruption_gives_the_same_weights(prompts: Path, tmp_path: Path) -> None:
    """Stopped right after its iteration-3 checkpoint and resumed, a PPO run ends with the weights, value head,
    KL controller and per-iteration logs of an uninterrupted one."""
    from safetensors.torch import load_file

    def run(out: str):
        return load_config(None, overrides(prompts, tmp_path / out, "train.max_steps=6", "train.save_steps=3",
                                           "task.max_new_tokens=3", "task.adaptive_kl=true", "task.kl_horizon=50",
                                           "task.mini_batch_size=8", "train.batch_size=8"))

    whole = train(run("whole"), quiet=True)
    interrupt_after_checkpoint(lambda: train(run("cut"), quiet=True), step=3)
    resumed = train(run("cut"), resume=True, quiet=True)
    last = "checkpoints/step-00000006"
    a, b = (load_file(r.run_dir / last / "trainable.safetensors") for r in (whole, resumed))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    ea, eb = (torch.load(r.run_dir / last / "extra.pt", weights_only=False)["extensions"]["rollout"]
              for r in (whole, resumed))
    assert float((ea["value_head"]["weight"] - eb["value_head"]["weight"]).abs().max()) < 1e-6
    assert float(ea["value_head"]["weight"].abs().max()) > 0  # the value head trained
    assert ea["kl_controller"]["value"] == pytest.approx(eb["kl_controller"]["value"], abs=1e-9)
    ra, rb = _train_rows(whole.run_dir), _train_rows(resumed.run_dir)
    assert [r["step"] for r in rb] == list(range(1, 7))
    assert [r["reward"] for r in ra] == pytest.approx([r["reward"] for r in rb], abs=1e-6)


def test_bad_reward_sources_are_config_errors_naming_the_key(prompts: Path, tmp_path: Path) -> None:
    def load(*extra: str):
        run = load_config(None, overrides(prompts, tmp_path / "bad", *extra))
        objective = get_objective(run)
        objective.load_data(run)
        return run

    with pytest.raises(ConfigError, match=r"task\.reward.*neither a run directory nor a function"):
        load("task.reward=nowhere")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load("task.reward=no_such_module:f")
    with pytest.raises(ConfigError, match="has no callable 'missing'"):
        load("task.reward=test_ppo:missing")
    # a run of the wrong kind (an SFT run): refused before any model loads
    fake = tmp_path / "sft-run"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "config.json").write_text("{}", encoding="utf-8")
    (fake / "config.yaml").write_text("model: tiny-llama\ntask: sft\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is a 'sft' run; task\.reward takes a reward-model run") as e:
        load(f"task.reward={fake}")
    assert e.value.key == "task.reward"
    # functions that raise or return a non-number: found on the first rollout, exit 2 with the key
    with pytest.raises(ConfigError, match=r"reward function 'test_ppo:raises' raised RuntimeError: the scorer is down"):
        train(load_config(None, overrides(prompts, tmp_path / "r1", "task.reward=test_ppo:raises", "train.max_steps=1")),
              quiet=True)
    with pytest.raises(ConfigError, match="returned 'good' for completion 0; a reward must be a finite number"):
        train(load_config(None, overrides(prompts, tmp_path / "r2", "task.reward=test_ppo:not_a_number",
                                          "train.max_steps=1")), quiet=True)
    bad = tmp_path / "badfn.py"
    bad.write_text("def f(prompts, completions):\n    return [float('nan')] * len(completions)\n", encoding="utf-8")
    args = overrides(prompts, tmp_path / "r3", "task.reward=badfn:f", "train.max_steps=1")
    proc = cli("train", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "config error at 'task.reward'" in proc.stdout + proc.stderr and "nan" in proc.stdout + proc.stderr


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("recipe", "expect"), [
    ("kto-smollm2-lora.yaml", ["config ok: task=kto method=lora model=smollm2-135m", "train=160, validation=40"]),
    ("ppo-smollm2-positive.yaml", ["config ok: task=ppo method=lora model=smollm2-135m", "train=2000, validation=32",
                                   "reward: classification runs/sst2-minilm (label '1')"]),
])
def test_alignment_recipes_validate(recipe: str, expect: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneforge.inference import validate_run

    monkeypatch.chdir(REPO)  # recipes name ../shared/... and runs/... relative to the checkout
    run = load_config(REPO / "recipes" / recipe)
    assert (REPO / "recipes" / recipe).read_text().startswith(f"# tuneforge train recipes/{recipe}")
    if not Path(run.data.train).is_file():
        pytest.skip(f"shared data not found: {run.data.train}")
    if run.task.name == "ppo" and not (REPO / run.task.reward / "model").is_dir():
        with pytest.raises(ConfigError, match=r"task\.reward"):  # the reward run must be trained first
            validate_run(run)
        pytest.skip(f"the reward run {run.task.reward} is not trained here (recipes/sst2-minilm.yaml)")
    summary = validate_run(run)
    for text in expect:
        assert text in summary, summary


def _methods() -> list[str]:
    from tuneforge.methods import METHODS

    return [m for m in sorted(METHODS) if m not in ("frozen", "qlora")]  # frozen: refused (no LM head to train)


@pytest.mark.parametrize("method", _methods())
def test_every_method_trains_ppo_with_its_reference_context(method: str, prompts: Path, tmp_path: Path) -> None:
    """Two iterations under each method. The first samples from the untrained policy, which the method's
    reference context reproduces (KL 0), except for methods that prepend freshly initialised virtual tokens
    (prefix, prompt, P-tuning v2): their untrained policy already differs from the base, which is the reference."""
    model = "tiny-gpt2" if method == "bitfit" else "tiny-llama"  # llama has no biases
    res = train(load_config(None, overrides(prompts, tmp_path / "run", f"method={method}", f"model={model}",
                                            "train.max_steps=2", "train.batch_size=4", "task.max_new_tokens=3",
                                            "train.eval_steps=2", "data.max_eval_samples=4")), quiet=True)
    rows = _train_rows(res.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    run = load_config(res.run_dir / "config.yaml")
    if not run.method.virtual_tokens:  # qat: the reference is the fp32 base, the policy fake-quantised (7.8e-5)
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-3 if method == "qat" else 1e-5)
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["loss"]) for r in rows)
    assert res.metrics["splits"]["validation"]["examples"] == 4
