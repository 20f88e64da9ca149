"""Models from scratch: config validation naming keys, size presets, vocabulary and special ids taken from
the tokenizer, exact parameter counts, refused architecture/objective pairs, and short scratch runs (MLM
and CLM) whose folders load in plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.models.anatomy import trainable_summary
from tuneforge.models.scratch import build_scratch, describe, load_or_build, scratch_dims
from tuneforge.pipeline import train
from tuneforge.tokenizers_train import train_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "src" / "tuneforge" / "assets" / "tiny_corpus.txt"


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    kinds = {"bert": "wordpiece", "roberta": "bytelevel-bpe", "gpt2": "bytelevel-bpe", "llama": "bpe",
             "t5": "bytelevel-bpe"}
    for family, kind in kinds.items():
        train_tokenizer([CORPUS], root / family, type=kind, family=family, vocab_size=600, min_frequency=1)
    return {f: root / f for f in kinds}


def _scratch(toks: dict[str, Path], arch: str, *extra: str):
    return load_config(None, ["model.init=scratch", f"model.architecture={arch}", f"model.tokenizer={toks[arch]}",
                              "model.size=tiny", *extra])


@pytest.mark.parametrize(("overrides", "key", "needle"), [
    (["model.init=scratch", "model.tokenizer=x"], "model", "needs model.architecture; allowed: bert, roberta, gpt2, llama, t5"),
    (["model.init=scratch", "model.architecture=gpt2"], "model", "needs model.tokenizer"),
    (["model.init=scratch", "model.architecture=gpt2", "model.tokenizer=x", "model.hidden=250", "model.heads=4"],
     "model", "model.hidden=250 must be divisible by model.heads=4"),
    (["model.init=scratch", "model.architecture=gpt2", "model.tokenizer=x", "model.heads=3"],
     "model", "model.hidden=256 must be divisible by model.heads=3"),
    (["model.size=small"], "model", "model.size only applies with model.init=scratch"),
    (["model.init=scratch", "model.architecture=gpt3", "model.tokenizer=x"], "model.architecture", "gpt2"),
    (["model.init=scratch", "model.architecture=gpt2", "model.tokenizer=x", "method=lora"], "method.name",
     "allowed: full, partial"),
])
def test_config_errors_name_keys(overrides: list[str], key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key and needle in str(info.value)


def test_sizes_and_overrides() -> None:
    def dims(*o: str):
        return scratch_dims(load_config(None, ["model.init=scratch", "model.architecture=gpt2", "model.tokenizer=x",
                                               *o]).model)

    assert dims() == (4, 256, 4, 1024)  # small is the default
    assert dims("model.size=tiny") == (2, 128, 2, 512)
    assert dims("model.size=base") == (12, 768, 12, 3072)
    assert dims("model.size=tiny", "model.layers=3", "model.hidden=96", "model.heads=3") == (3, 96, 3, 384)
    assert dims("model.intermediate=100") == (4, 256, 4, 100)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama", "t5"])
def test_vocabulary_and_special_ids_come_from_the_tokenizer(toks, arch: str) -> None:
    from transformers import AutoModel

    run = _scratch(toks, arch)
    model, tok = build_scratch(run, AutoModel)
    cfg = model.config
    assert cfg.vocab_size == len(tok) == 600 and model.get_input_embeddings().num_embeddings == 600
    assert cfg.pad_token_id == tok.pad_token_id is not None
    if arch != "bert":
        assert cfg.eos_token_id == tok.eos_token_id
    if arch == "t5":
        assert cfg.decoder_start_token_id == tok.pad_token_id and cfg.d_kv == 64 and cfg.num_decoder_layers == 2
    assert describe(run) == f"{arch} from scratch (2 layers x 128, 2 heads, mlp 512)"


def test_gpt2_parameter_count_is_exact(toks) -> None:
    run = _scratch(toks, "gpt2", "model.layers=3", "model.hidden=96", "model.heads=4")
    model, _ = build_scratch(run, AutoModelForCausalLM)
    V, P, H, L = 600, 512, 96, 3
    # embeddings + positions + per block (2 norms, qkv, out proj, 4x MLP) + final norm; LM head tied
    assert trainable_summary(model) == (V * H + P * H + L * (12 * H * H + 13 * H) + 2 * H,) * 2


@pytest.mark.parametrize(("task", "arch", "head"), [("mlm", "gpt2", AutoModelForMaskedLM),
                                                    ("clm", "bert", AutoModelForCausalLM)])
def test_objective_refuses_an_unfit_architecture(toks, task: str, arch: str, head) -> None:
    run = _scratch(toks, arch, f"task={task}")
    allowed = ("bert", "roberta") if task == "mlm" else ("gpt2", "llama")
    with pytest.raises(ConfigError, match=f"cannot train a '{arch}' model from scratch") as info:
        load_or_build(run, head, toks[arch], architectures=allowed)
    assert info.value.key == "model.architecture"


def test_missing_tokenizer_folder_is_a_config_error(tmp_path: Path) -> None:
    run = load_config(None, ["model.init=scratch", "model.architecture=gpt2", f"model.tokenizer={tmp_path}"])
    with pytest.raises(ConfigError, match="not a tokenizer folder") as info:
        build_scratch(run, AutoModelForCausalLM)
    assert info.value.key == "model.tokenizer"


@pytest.mark.parametrize(("task", "arch", "head"), [("mlm", "roberta", AutoModelForMaskedLM),
                                                    ("clm", "gpt2", AutoModelForCausalLM)])
def test_scratch_run_learns_and_saves_a_plain_folder(toks, tmp_path: Path, capsys, task: str, arch: str, head) -> None:
    run = _scratch(toks, arch, f"task={task}", f"data.train={CORPUS}", "data.max_length=64", "train.batch_size=16",
                   "train.max_steps=12", "train.lr=3e-3", "train.warmup_steps=0", "train.precision=fp32",
                   "train.eval_steps=6", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}")
    res = train(run, quiet=False)
    out = capsys.readouterr().out
    model = head.from_pretrained(tmp_path / "run" / "model")
    n = sum(p.numel() for p in model.parameters())
    assert f"model {arch} from scratch (2 layers x 128, 2 heads, mlp 512): {n:,} parameters" in out
    hist = res.metrics["train"]
    assert hist["steps"] == 12
    from tuneforge.track import read_metrics

    evals = [r["loss"] for r in read_metrics(tmp_path / "run") if r.get("split") == "eval"]
    assert evals[-1] < evals[0]
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path / "run" / "model")) == 600


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[2] / "recipes").glob("pretrain-*.yaml")),
                         ids=lambda p: p.name)
def test_pretraining_recipes_validate(recipe: Path) -> None:
    run = load_config(recipe)
    assert run.task.name in ("mlm", "span_corruption", "clm") and run.output_dir is not None
    assert recipe.read_text().startswith("#") and "tuneforge train recipes/" + recipe.name in recipe.read_text()
