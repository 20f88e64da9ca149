"""Malformed input through the CLI: one clear line naming the file/line or key, exit code 2, no traceback,
and no run directory left behind.

Errors are raised before any weights load, so most cases call ``tuneforge.cli.main`` in-process (fast); a
representative few run as real subprocesses, exactly as a user does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _common import cli, cli_env, sentiment_rows, write_csv

pytestmark = pytest.mark.e2e


def run_subprocess(args: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = cli(*args, cwd=cwd, check=False, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def run_inprocess(monkeypatch, capsys):
    """Call ``tuneforge.cli.main`` with argv; returns (exit code, stdout, stderr)."""
    from tuneforge import cli

    for key, value in cli_env().items():
        if key.startswith(("TUNEFORGE", "HF_", "TOKENIZERS", "TRANSFORMERS")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.delenv("TUNEFORGE_DEBUG", raising=False)

    def call(args: list[str], cwd: Path) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["tuneforge", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main()
        out, err = capsys.readouterr()
        code = exc.value.code
        return (0 if code is None else code), out, err

    return call


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    """A good train/validation pair plus one malformed file per failure mode."""
    d: dict[str, Path] = {}
    d["train"] = write_csv(tmp_path / "train.csv", sentiment_rows(90))
    d["val"] = write_csv(tmp_path / "val.csv", sentiment_rows(30, offset=90))

    d["no_text_col"] = write_csv(
        tmp_path / "no_text_col.csv", sentiment_rows(12), header=("sentence", "label")
    )

    rows = sentiment_rows(12)
    rows[6] = ("   ", rows[6][1])  # header is line 1, so rows[6] is on line 8
    d["empty_text"] = write_csv(tmp_path / "empty_text.csv", rows)

    lines = ["text,label"] + [f"{t},{y}" for t, y in sentiment_rows(12)]
    lines[5] = lines[5] + ",surplus"  # line 6
    d["ragged"] = tmp_path / "ragged.csv"
    d["ragged"].write_text("\n".join(lines) + "\n", encoding="utf-8")

    vrows = sentiment_rows(20, offset=90)
    vrows[9] = (vrows[9][0], "sarcastic")  # line 11 of the validation file
    d["val_unknown_label"] = write_csv(tmp_path / "val_unknown_label.csv", vrows)

    raw = ("text,label\n" + "".join(f"{t},{y}\n" for t, y in sentiment_rows(12))).encode("utf-8").split(b"\n")
    raw[6] = raw[6][:3] + b"\xff\xfe" + raw[6][3:]  # invalid UTF-8 on line 7
    d["bad_encoding"] = tmp_path / "bad_encoding.csv"
    d["bad_encoding"].write_bytes(b"\n".join(raw))

    d["empty"] = tmp_path / "empty.csv"
    d["empty"].write_bytes(b"")
    d["header_only"] = tmp_path / "header_only.csv"
    d["header_only"].write_text("text,label\n", encoding="utf-8")
    d["missing"] = tmp_path / "does_not_exist.csv"
    return d


def assert_clean_error(code: int, out: str, err: str, *needles: str) -> str:
    """Exit 2, a single 'error:' line on stderr containing every needle, no traceback."""
    assert code == 2, f"exit code {code}; stdout={out!r} stderr={err!r}"
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------- data errors (in-process)


def _base(d: dict[str, Path], out: Path, **over: str) -> list[str]:
    args = {
        "model": "tiny-bert",
        "data.train": str(d["train"]),
        "data.validation": str(d["val"]),
        "output_dir": str(out),
        "train.max_steps": "2",
        "train.batch_size": "8",
    }
    args.update(over)
    return ["train", *(f"{k}={v}" for k, v in args.items())]


def test_missing_text_column_lists_available_columns(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, **{"data.train": str(data["no_text_col"])}), tmp_path)
    assert_clean_error(code, so, se, str(data["no_text_col"]), "'text'", "available columns: sentence, label")
    assert not out.exists()


def test_empty_text_names_file_and_line(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, **{"data.train": str(data["empty_text"])}), tmp_path)
    assert_clean_error(code, so, se, f"{data['empty_text']}:8:", "empty text")
    assert not out.exists()


def test_ragged_row_names_file_and_line(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, **{"data.train": str(data["ragged"])}), tmp_path)
    assert_clean_error(code, so, se, f"{data['ragged']}:6:", "3 fields", "has 2")
    assert not out.exists()


def test_unknown_label_in_validation_names_validation_file_and_line(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(
        _base(data, out, **{"data.validation": str(data["val_unknown_label"])}), tmp_path
    )
    line = assert_clean_error(code, so, se, f"{data['val_unknown_label']}:11:", "'sarcastic'")
    for label in ("negative", "neutral", "positive"):
        assert label in line  # the training label set is listed
    assert not out.exists()


def test_bad_encoding_names_line(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, **{"data.train": str(data["bad_encoding"])}), tmp_path)
    assert_clean_error(code, so, se, f"{data['bad_encoding']}:7:", "utf-8")
    assert not out.exists()


@pytest.mark.parametrize(
    ("which", "needle"),
    [("empty", "empty"), ("header_only", "no data rows"), ("missing", "not found")],
)
def test_empty_header_only_and_missing_train_file(data, tmp_path, run_inprocess, which, needle):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, **{"data.train": str(data[which])}), tmp_path)
    assert_clean_error(code, so, se, str(data[which]), needle)
    assert not out.exists()


# --------------------------------------------------------------------------- config errors (in-process)


@pytest.mark.parametrize("args", [["train", "--dry-run"], ["eval", "--no-such-flag"], ["train", "--nproc", "zero"]])
def test_unknown_or_bad_option_is_a_usage_error_without_traceback(args, tmp_path, run_inprocess):
    code, _, err = run_inprocess(args, tmp_path)
    assert code == 2, err
    assert "Traceback" not in err
    assert "No such option" in err or "Invalid value" in err
    assert "Usage: " in err and "--help' for help" in err  # the program name depends on how python was started


def test_unknown_config_key_names_the_key(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess([*_base(data, out), "train.learning_rate=1e-3"], tmp_path)
    line = assert_clean_error(code, so, se, "train.learning_rate", "unknown key")
    assert "lr" in line.split("unknown key", 1)[1]  # lists the allowed keys
    assert not out.exists()


def test_unknown_top_level_key_names_the_key(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess([*_base(data, out), "trainer.lr=1e-3"], tmp_path)
    assert_clean_error(code, so, se, "'trainer'", "unknown key")
    assert not out.exists()


def test_bad_literal_value_lists_allowed_values(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, **{"train.schedule": "exponential"}), tmp_path)
    assert_clean_error(code, so, se, "train.schedule", "'linear'", "'cosine'", "'constant'")
    code, so, se = run_inprocess(_base(data, out, **{"train.precision": "fp8"}), tmp_path)
    assert_clean_error(code, so, se, "train.precision", "'auto'", "'bf16'", "'fp16'", "'fp32'")
    assert not out.exists()


def test_absent_device_and_cpu_fp16_name_their_key(data, tmp_path, run_inprocess):
    """`train.device=cuda` on a machine without one: exit 2, one line naming the key and what is present."""
    import torch

    from tuneforge.engine.runtime import available_devices

    out = tmp_path / "run"
    if not torch.cuda.is_available():
        code, so, se = run_inprocess(_base(data, out, **{"train.device": "cuda"}), tmp_path)
        assert_clean_error(code, so, se, "train.device", "'cuda' is not available",
                           "present: " + ", ".join(available_devices()))
    code, so, se = run_inprocess(_base(data, out, **{"train.device": "cpu", "train.precision": "fp16"}), tmp_path)
    assert_clean_error(code, so, se, "train.precision", "needs a GPU")
    assert not out.exists()


def test_unknown_model_lists_known_names(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, model="bert-huge-9000"), tmp_path)
    assert_clean_error(code, so, se, "'model'", "bert-huge-9000", "minilm-l6", "tiny-bert")
    assert not out.exists()


def test_unknown_method_lists_methods(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(_base(data, out, method="qlora-9000"), tmp_path)
    assert_clean_error(code, so, se, "method", "qlora-9000", "full", "frozen", "partial")
    assert not out.exists()


def test_partial_freeze_layers_out_of_range(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess(
        _base(data, out, method="partial", **{"method.freeze_layers": "99"}), tmp_path
    )
    assert_clean_error(code, so, se, "method.freeze_layers", "0..2")
    assert not out.exists()


def test_unknown_lora_target_lists_linear_modules_and_leaves_no_run_dir(data, tmp_path, run_inprocess):
    """Found only once the model is built (module names), but still before the run directory exists."""
    out = tmp_path / "run"
    code, so, se = run_inprocess(
        _base(data, out, method="lora", **{"method.target_modules": "[query,nope]"}), tmp_path
    )
    assert_clean_error(code, so, se, "nope", "query", "value")
    assert not out.exists()


def test_nonempty_output_dir_without_resume(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("do not touch", encoding="utf-8")
    code, so, se = run_inprocess(_base(data, out), tmp_path)
    assert_clean_error(code, so, se, "output_dir", str(out), "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert keep.read_text(encoding="utf-8") == "do not touch"


def test_resume_with_nothing_to_resume(data, tmp_path, run_inprocess):
    out = tmp_path / "run"
    code, so, se = run_inprocess([*_base(data, out), "--resume"], tmp_path)
    assert_clean_error(code, so, se, "nothing to resume", str(out))
    assert not out.exists()
    # an existing, empty run dir with an empty checkpoints/ folder: still nothing to resume
    (out / "checkpoints").mkdir(parents=True)
    code, so, se = run_inprocess([*_base(data, out), "--resume"], tmp_path)
    assert_clean_error(code, so, se, "nothing to resume")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_validate_inprocess_good_and_bad(data, tmp_path, run_inprocess):
    good = ["validate", "model=tiny-bert", f"data.train={data['train']}", f"data.validation={data['val']}"]
    code, so, se = run_inprocess(good, tmp_path)
    assert code == 0, se
    assert "config ok" in so and "train=90" in so and "validation=30" in so
    code, so, se = run_inprocess(["validate", "model=tiny-bert", f"data.train={data['ragged']}"], tmp_path)
    assert_clean_error(code, so, se, f"{data['ragged']}:6:")


# --------------------------------------------------------------------------- real subprocesses


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing_column", ("available columns: sentence, label",)),
        ("bad_encoding", (":7:", "utf-8")),
        ("val_unknown_label", (":11:", "'sarcastic'")),
        ("unknown_key", ("train.learning_rate", "unknown key")),
        ("freeze_layers", ("method.freeze_layers", "0..2")),
    ],
)
def test_errors_as_subprocess(data, tmp_path, case, needles):
    out = tmp_path / "run"
    over = {
        "missing_column": {"data.train": str(data["no_text_col"])},
        "bad_encoding": {"data.train": str(data["bad_encoding"])},
        "val_unknown_label": {"data.validation": str(data["val_unknown_label"])},
        "unknown_key": {"train.learning_rate": "1e-3"},
        "freeze_layers": {"method": "partial", "method.freeze_layers": "99"},
    }[case]
    code, so, se = run_subprocess(_base(data, out, **over), tmp_path)
    assert_clean_error(code, so, se, *needles)
    assert not out.exists()


def test_nonempty_output_dir_and_empty_resume_as_subprocess(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("x", encoding="utf-8")
    code, so, se = run_subprocess(_base(data, out), tmp_path)
    assert_clean_error(code, so, se, "output_dir", "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    fresh = tmp_path / "fresh"
    code, so, se = run_subprocess([*_base(data, fresh), "--resume"], tmp_path)
    assert_clean_error(code, so, se, "nothing to resume")
    assert not fresh.exists()


def test_validate_subprocess_good_recipe(data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: tiny-bert\n"
        f"data:\n  train: {data['train']}\n  validation: {data['val']}\n"
        "train:\n  max_steps: 5\n  batch_size: 8\n",
        encoding="utf-8",
    )
    code, so, se = run_subprocess(["validate", str(recipe)], tmp_path)
    assert code == 0, se
    assert "Traceback" not in se
    assert "config ok" in so
    assert "train=90" in so and "validation=30" in so
    assert not (tmp_path / "runs").exists()  # validate never creates a run directory


def test_validate_subprocess_bad_recipe(data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: tiny-bert\ndata:\n  train: {data['train']}\n  colour: blue\n", encoding="utf-8"
    )
    code, so, se = run_subprocess(["validate", str(recipe)], tmp_path)
    assert_clean_error(code, so, se, "data.colour", "unknown key")


def test_train_stderr_has_no_library_noise(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("x", encoding="utf-8")
    code, _, se = run_subprocess(_base(data, out), tmp_path)
    assert code == 2
    assert se.strip().splitlines() == [se.strip()], se
    assert se.startswith("error: ")
