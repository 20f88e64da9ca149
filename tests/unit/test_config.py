"""Config loading: override parsing, recipe merging, error messages and the YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import RunConfig, apply_overrides, load_config, parse_override, to_yaml
from tuneforge.errors import ConfigError, TuneforgeError


def _err(overrides: list[str], recipe: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, overrides)
    return info.value


# --------------------------------------------------------------------------- override parsing
@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train.lr=1e-3", "train.lr", 0.001),
        ("train.lr=1E-3", "train.lr", 0.001),
        ("train.lr=.5e-3", "train.lr", 0.0005),
        ("train.lr=2.5e-4", "train.lr", 0.00025),
        ("data.header=false", "data.header", False),
        ("data.header=true", "data.header", True),
        ("data.text_column=0", "data.text_column", 0),
        ("train.max_steps=null", "train.max_steps", None),
        ("train.adam_betas=[0.9, 0.98]", "train.adam_betas", [0.9, 0.98]),
        ("data.delimiter=", "data.delimiter", ""),
        ("model=tiny-bert", "model", "tiny-bert"),
        ("output_dir=runs/a=b", "output_dir", "runs/a=b"),  # only the first '=' splits
    ],
)
def test_parse_override_values(text: str, key: str, value: object) -> None:
    k, v = parse_override(text)
    assert k == key
    assert v == value
    assert type(v) is type(value)


def test_parse_override_rejects_malformed() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError) as info:
        parse_override("1train.lr=3")
    assert info.value.key == "1train.lr"


def test_overrides_typed_in_config() -> None:
    cfg = load_config(
        None, ["train.lr=1e-3", "data.header=false", "data.text_column=0", "train.batch_size=8"]
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(0.001)
    assert cfg.lr == pytest.approx(0.001)
    assert cfg.data.header is False
    assert cfg.data.text_column == 0 and isinstance(cfg.data.text_column, int)
    assert cfg.train.batch_size == 8


def test_quoted_column_stays_a_string() -> None:
    cfg = load_config(None, ["data.text_column='0'"])
    assert cfg.data.text_column == "0"


def test_model_shorthand() -> None:
    cfg = load_config(None, ["model=tiny-bert"])
    assert cfg.model.name == "tiny-bert"
    assert cfg.model.attn_implementation == "sdpa"
    cfg = load_config(None, ["model=tiny-bert", "model.attn_implementation=eager"])
    assert (cfg.model.name, cfg.model.attn_implementation) == ("tiny-bert", "eager")


def test_method_shorthand_and_option() -> None:
    cfg = load_config(None, ["method=partial", "method.freeze_layers=1"])
    assert cfg.method.name == "partial"
    assert cfg.method.freeze_layers == 1
    assert cfg.method.freeze_embeddings is True
    assert cfg.lr == pytest.approx(5e-5)  # partial's default lr


def test_method_default_lrs() -> None:
    assert load_config(None, ["method=frozen"]).lr == pytest.approx(1e-2)
    assert load_config(None, ["method=full"]).lr == pytest.approx(5e-5)
    assert load_config(None, []).method.name == "full"


def test_switching_method_drops_old_options(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: partial\n  freeze_layers: 1\n  freeze_embeddings: false\n")
    cfg = load_config(recipe, ["method=frozen"])
    assert cfg.method.name == "frozen"
    assert cfg.method.cache_features is True
    assert not hasattr(cfg.method, "freeze_layers")
    # re-stating the same method keeps its options
    cfg = load_config(recipe, ["method=partial"])
    assert (cfg.method.freeze_layers, cfg.method.freeze_embeddings) == (1, False)


def test_switching_model_keeps_model_options(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: tiny-bert\n  attn_implementation: eager\n")
    cfg = load_config(recipe, ["model=tiny-llama"])
    assert (cfg.model.name, cfg.model.attn_implementation) == ("tiny-llama", "eager")


def test_method_option_before_method_name_is_kept() -> None:
    cfg = load_config(None, ["method.freeze_layers=1", "method=partial"])
    assert cfg.method.freeze_layers == 1


def test_apply_overrides_on_tree() -> None:
    tree = apply_overrides({"method": "partial"}, ["method.freeze_layers=1", "train.lr=3e-4"])
    assert tree == {"method": {"name": "partial", "freeze_layers": 1}, "train": {"lr": 3e-4}}
    with pytest.raises(ConfigError) as info:
        apply_overrides({"train": {"batch_size": 8}}, ["train.batch_size.x=1"])
    assert info.value.key == "train.batch_size"


def test_recipe_and_overrides_merge(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: tiny-bert\n"
        "method:\n  name: partial\n  freeze_layers: 1\n"
        "train:\n  lr: 1.0e-4\n  batch_size: 4\n  epochs: 2\n"
        "data:\n  train: train.csv\n"
    )
    cfg = load_config(recipe, ["train.batch_size=8", "method.freeze_embeddings=false"])
    assert cfg.model.name == "tiny-bert"
    assert cfg.method.name == "partial"
    assert cfg.method.freeze_layers == 1  # from the recipe
    assert cfg.method.freeze_embeddings is False  # from the override
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 8  # override wins
    assert cfg.train.epochs == 2.0
    assert cfg.data.train == Path("train.csv")


def test_recipe_is_optional() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg == RunConfig()
    assert cfg.model.name == "minilm-l6"
    assert cfg.train.batch_size == 32
    assert load_config(None, None) == cfg


def test_empty_recipe_is_defaults(tmp_path: Path) -> None:
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("")
    assert load_config(recipe) == RunConfig()


# --------------------------------------------------------------------------- errors
def test_unknown_key_names_key_and_allowed_keys() -> None:
    e = _err(["train.lrr=1e-3"])
    assert e.key == "train.lrr"
    msg = str(e)
    assert "train.lrr" in msg
    assert "allowed keys" in msg
    assert "lr" in msg.split("allowed keys", 1)[1]
    assert e.exit_code == 2 and isinstance(e, TuneforgeError)


def test_unknown_key_in_data_and_model_blocks() -> None:
    e = _err(["data.txt_column=x"])
    assert e.key == "data.txt_column"
    assert "allowed keys" in str(e) and "text_column" in str(e)
    e = _err(["model.foo=1"])
    assert e.key == "model.foo"
    assert "allowed keys: name, attn_implementation" in str(e)


def test_unknown_top_level_key() -> None:
    e = _err(["trian.lr=1"])
    assert e.key == "trian"
    msg = str(e)
    assert "allowed top-level keys" in msg
    for block in ("model", "task", "method", "data", "train", "output_dir"):
        assert block in msg


def test_unknown_key_in_method_block_names_key() -> None:
    e = _err(["method=partial", "method.freeze=1"])
    assert e.key == "method.freeze"
    assert "unknown key" in str(e)


def test_unknown_key_in_method_block_lists_allowed_keys() -> None:
    e = _err(["method=partial", "method.freeze=1"])
    assert "allowed keys" in str(e)
    assert "freeze_layers" in str(e)


def test_wrong_type_names_key() -> None:
    e = _err(["train.batch_size=abc"])
    assert e.key == "train.batch_size"
    assert "train.batch_size" in str(e)
    assert "integer" in str(e)
    e = _err(["data.header=maybe"])
    assert e.key == "data.header"
    assert "bool" in str(e)


def test_out_of_range_names_key() -> None:
    e = _err(["train.lr=0"])
    assert e.key == "train.lr"
    assert "greater than 0" in str(e)
    e = _err(["method=partial", "method.freeze_layers=-1"])
    assert e.key == "method.freeze_layers"


def test_bad_literal_lists_allowed_values() -> None:
    e = _err(["train.schedule=exponential"])
    assert e.key == "train.schedule"
    for allowed in ("'linear'", "'cosine'", "'constant'"):
        assert allowed in str(e)
    e = _err(["train.precision=fp8"])
    assert e.key == "train.precision"
    for allowed in ("'auto'", "'bf16'", "'fp16'", "'fp32'"):
        assert allowed in str(e)


def test_unknown_method_lists_allowed() -> None:
    e = _err(["method=lora2"])
    assert e.key == "method"
    msg = str(e)
    assert "lora2" in msg
    from tuneforge.methods import METHODS

    assert "allowed: " + ", ".join(sorted(METHODS)) in msg


def test_unknown_task_lists_allowed() -> None:
    e = _err(["task=regression"])
    assert e.key == "task"
    assert "allowed: classification" in str(e)


def test_frozen_refuses_layer_lr_decay() -> None:
    e = _err(["method=frozen", "train.layer_lr_decay=0.8"])
    assert "no layers to act on with method 'frozen'" in str(e)
    # the other methods accept it
    assert load_config(None, ["method=partial", "train.layer_lr_decay=0.8"]).train.layer_lr_decay == 0.8


def test_frozen_refuses_layer_lr_decay_names_key() -> None:
    e = _err(["method=frozen", "train.layer_lr_decay=0.8"])
    assert e.key == "train.layer_lr_decay"
    assert "train.layer_lr_decay" in str(e)


def test_text_pair_equal_to_text_column_refused() -> None:
    e = _err(["data.text_pair_column=text"])
    assert "data.text_column" in str(e)
    e = _err(["data.text_column=0", "data.text_pair_column=0"])
    assert "must differ" in str(e)
    # different columns are fine
    cfg = load_config(None, ["data.text_column=0", "data.text_pair_column=1"])
    assert (cfg.data.text_column, cfg.data.text_pair_column) == (0, 1)


def test_text_pair_equal_to_text_column_names_key() -> None:
    e = _err(["data.text_pair_column=text"])
    assert e.key == "data.text_pair_column"
    assert "data.text_pair_column" in str(e)


def test_early_stopping_needs_several_evals() -> None:
    e = _err(["train.early_stopping_patience=2", "train.epochs=1"])
    assert "several evaluations" in str(e)
    cfg = load_config(None, ["train.early_stopping_patience=2", "train.epochs=1", "train.eval_steps=5"])
    assert cfg.train.early_stopping_patience == 2


def test_non_mapping_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- a\n- b\n")
    e = _err([], recipe)
    assert str(recipe) in str(e)
    assert "mapping" in str(e)


def test_invalid_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train: {lr: [\n")
    e = _err([], recipe)
    assert "not valid YAML" in str(e)


def test_missing_recipe_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    e = _err([], missing)
    assert "recipe file not found" in str(e)
    assert str(missing) in str(e)


def test_bad_encoding_names_key() -> None:
    e = _err(["data.encoding=utf-99"])
    assert e.key == "data.encoding"
    assert "utf-99" in str(e)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "overrides",
    [
        ["train.lr=5e-5"],
        [
            "model=tiny-bert",
            "method=partial",
            "method.freeze_layers=1",
            "train.lr=1e-5",
            "train.layer_lr_decay=0.8",
            "data.delimiter=\t",
            "task.class_weights={a: 2.0, b: 1}",
            "train.adam_betas=[0.9, 0.98]",
        ],
        [
            "method=frozen",
            "method.cache_features=false",
            "train.lr=2e-3",
            "task.class_weights=balanced",
            "output_dir=/tmp/run dir",
            "data.text_column=0",
            "data.label_column=1",
            "data.header=false",
            "data.train=/tmp/a b.csv",
            "train.max_grad_norm=null",
            "train.precision=fp32",
        ],
        [
            "train.lr=3e-4",
            "data.text_column='0'",
            "data.text_pair_column=1",
            "train.metric=loss",
            "train.early_stopping_patience=2",
            "train.eval_steps=10",
            "train.max_steps=100",
        ],
    ],
)
def test_to_yaml_round_trip(overrides: list[str], tmp_path: Path) -> None:
    cfg = load_config(None, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert to_yaml(again) == to_yaml(cfg)


def test_to_yaml_resolves_default_lr(tmp_path: Path) -> None:
    cfg = load_config(None, ["method=frozen"])
    assert cfg.train.lr is None
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert again.train.lr == pytest.approx(1e-2)  # written explicitly so the re-run is pinned
    assert again.lr == cfg.lr
    assert again.model_dump(exclude={"train": {"lr"}}) == cfg.model_dump(exclude={"train": {"lr"}})
