"""The new-run form of `tuneforge ui`: its inputs are the schema's keys (walked here independently of the UI),
its values round-trip through the CLI's own parser, a bad value is refused on its field with the CLI's
message, and a run launched from it writes the same ``config.yaml`` as the CLI given the same values; a
launched run stops on SIGINT with its checkpoint kept and resumes to the end."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import types
from html.parser import HTMLParser
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")
from fastapi.testclient import TestClient
from markupsafe import escape
from pydantic import BaseModel, Field

from tuneforge.config import MethodConfig, load_config, register_method_config, schema
from tuneforge.errors import ConfigError
from tuneforge.ui import create_app
from tuneforge.ui import form as formlib
from ui_support import write_csv

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the schema, walked by the test
def _plain(ann: Any) -> Any:
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return _plain(args[0]) if len(args) == 1 else ann
    return ann


def _is_ext(ann: Any) -> bool:
    ann = _plain(ann)
    return isinstance(ann, type) and issubclass(ann, schema.ExtensionConfig)


def schema_inputs() -> set[str]:
    """Every key of RunConfig as the form names it: blocks flattened, each registered method/task/extension
    with its own fields (named blocks: ``method[lora].r``; extensions/retain: a switch plus fields)."""
    schema._ensure_registries()
    named = {schema.TaskConfig: schema._TASK_CONFIGS, schema.MethodConfig: schema._METHOD_CONFIGS}
    keys: set[str] = set()

    def block(cls: type[BaseModel], prefix: str) -> None:
        for name, info in cls.model_fields.items():
            ann = _plain(info.annotation)
            if isinstance(ann, type) and issubclass(ann, schema.StrictModel):
                block(ann, f"{prefix}{info.alias or name}.")
            else:
                keys.add(f"{prefix}{info.alias or name}")

    def variants(top: str, registry: dict[str, type[BaseModel]], switch: bool) -> None:
        for n, cls in registry.items():
            if switch:
                keys.add(f"{top}[{n}]")
            keys.update(f"{top}[{n}].{i.alias or f}" for f, i in cls.model_fields.items() if f != "name")

    for top, info in schema.RunConfig.model_fields.items():
        ann = _plain(info.annotation)
        if ann in named:
            keys.add(f"{top}.name")
            variants(top, named[ann], False)
        elif get_origin(ann) is list and _is_ext(get_args(ann)[0]):
            variants(top, schema._EXTENSION_CONFIGS, True)
        elif get_origin(ann) is dict and _is_ext(get_args(ann)[1]):
            variants(top, {n: c for n, c in schema._EXTENSION_CONFIGS.items() if c.retain}, True)
        elif isinstance(ann, type) and issubclass(ann, schema.StrictModel):
            block(ann, f"{top}.")
        else:
            keys.add(top)
    return keys


class _Inputs(HTMLParser):
    def __init__(self, form_id: str):
        super().__init__()
        self.form_id, self.inside, self.names, self.selects = form_id, False, [], {}
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        elif self.inside and tag in ("input", "select", "textarea") and a.get("name"):
            self.names.append(a["name"])
            if tag == "select":
                self._select = a["name"]
                self.selects[a["name"]] = []
        elif tag == "option" and self._select:
            self.selects[self._select].append(a.get("value"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self._select = None


def parse_form(html: str) -> _Inputs:
    p = _Inputs("run-form")
    p.feed(html)
    return p


@pytest.fixture()
def ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    data.mkdir()
    files = {"train": write_csv(data / "train.csv", 48), "val": write_csv(data / "val.csv", 15)}
    app = create_app(tmp_path / "runs", cwd=tmp_path, try_it=False)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        c.token, c.jobs, c.root = app.state.token, app.state.jobs, tmp_path
        c.files = files
        yield c


def test_form_inputs_equal_the_schema_keys(ui) -> None:
    form = parse_form(ui.get("/new").text)
    names = [n for n in form.names if n not in ("_token", "_recipe")]
    assert len(names) == len(set(names))
    assert set(names) == schema_inputs()
    assert {"train.lr", "method[lora].r", "task[sft].template", "retain[ewc].lambda", "output_dir"} <= set(names)
    # enums are selects with the allowed values; bools true/false; a nullable enum can be left empty
    assert form.selects["train.schedule"] == list(get_args(schema.TrainConfig.model_fields["schedule"].annotation))
    assert form.selects["data.header"] == ["true", "false"]
    assert form.selects["model.size"][0] == "" and "tiny" in form.selects["model.size"]
    assert set(form.selects["method.name"]) == set(schema._METHOD_CONFIGS)
    assert set(form.selects["task.name"]) == set(schema._TASK_CONFIGS)


def test_a_newly_registered_option_appears_without_a_ui_edit(ui) -> None:
    class ProbeConfig(MethodConfig):
        """A method registered by this test only."""

        name: Literal["ui_probe"] = "ui_probe"
        flavour: Literal["sweet", "sour"] = Field("sour", description="the probe's flavour")
        depth: int = Field(3, ge=1, description="how deep")

    register_method_config("ui_probe", ProbeConfig)
    try:
        html = ui.get("/new").text
        form = parse_form(html)
        assert {"method[ui_probe].flavour", "method[ui_probe].depth"} <= set(form.names)
        assert form.selects["method[ui_probe].flavour"] == ["sweet", "sour"] and "ui_probe" in form.selects["method.name"]
        assert "the probe&#39;s flavour" in html and "how deep" in html
        assert set(form.names) - {"_token", "_recipe"} == schema_inputs()
    finally:
        schema._METHOD_CONFIGS.pop("ui_probe", None)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_form_values_round_trip_every_recipe(recipe: str) -> None:
    path = REPO / "recipes" / recipe
    try:
        cfg = load_config(path)
    except ConfigError:
        pytest.skip(f"{recipe} does not validate here")
    sections = formlib.build_form()
    values = formlib.form_values(sections, cfg)
    assert formlib.form_overrides(sections, values, cfg) == []  # unchanged form: the recipe as it is
    seed = cfg.train.seed + 1
    edited = {**values, "train.seed": str(seed), "train.lr": "0.00123", "data.encoding": "cp1252", "output_dir": ""}
    overrides = formlib.form_overrides(sections, edited, cfg)
    assert overrides == ["data.encoding=cp1252", "train.lr=0.00123", f"train.seed={seed}",
                         *(["output_dir=null"] if cfg.output_dir is not None else [])]
    again = load_config(path, overrides)
    assert again.model_dump() == cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"seed": seed, "lr": 0.00123}),
        "data": cfg.data.model_copy(update={"encoding": "cp1252"}), "output_dir": None}).model_dump()


def test_values_yaml_would_misread_are_quoted_and_blocks_switch_like_the_cli() -> None:
    sections = formlib.build_form()
    base = load_config(None, ["method=lora", "method.r=16"])
    values = {**formlib.form_values(sections, base), "method.name": "adapter", "method[adapter].bottleneck": "8",
              "data.text_column": "0", "data.delimiter": "true", "retain[l2sp]": "on",
              "retain[l2sp].alpha": "0.5", "extensions[samples]": "on", "extensions[samples].enabled": "false"}
    overrides = formlib.form_overrides(sections, values, base)
    assert overrides[0] == "method=adapter"  # a name change first: the old name's options are dropped
    cfg = load_config(None, ["method=lora", "method.r=16", *overrides])
    assert cfg.method.name == "adapter" and cfg.method.bottleneck == 8
    assert cfg.data.text_column == 0 and cfg.data.delimiter == "true"  # str | int reads YAML; str stays text
    assert cfg.retain["l2sp"].alpha == 0.5 and cfg.extension("samples").enabled is False


def test_a_bad_value_is_refused_on_its_field_with_the_cli_message(ui) -> None:
    form = {"_token": ui.token, "_recipe": "", "model.name": "tiny-bert", "train.batch_size": "abc",
            "method.name": "lora", "method[lora].r": "0", "data.train": str(ui.files["train"])}
    r = ui.post("/new", data=form)
    assert r.status_code == 422
    for key, value, inp in (("train.batch_size", "abc", "train.batch_size"), ("method.r", "0", "method[lora].r")):
        with pytest.raises(ConfigError) as e:
            load_config(None, ["method=lora", f"{key}={value}"])
        msg = str(e.value).split(": ", 1)[1].split("\n")[-1].strip().removeprefix(f"{key}: ")
        field = _field_html(r.text, inp)
        assert 'class="field invalid"' in field and str(escape(msg)) in field, (inp, msg)
    assert 'value="abc"' in r.text  # the user's values are kept
    assert not (ui.root / "runs").exists() or not any(p for p in (ui.root / "runs").iterdir() if p.name[0] != ".")
    # the JSON check says the same, per input
    j = ui.post("/api/validate", data=form).json()
    assert set(j["errors"]) == {"train.batch_size", "method[lora].r"} and not j["ok"]


def test_output_dir_must_stay_inside_the_runs_folder(ui) -> None:
    base = {"_token": ui.token, "model.name": "tiny-bert", "data.train": str(ui.files["train"])}
    for out in ("../elsewhere", str(ui.root / "data"), "runs/.tuneforge-ui/x"):
        j = ui.post("/api/validate", data={**base, "output_dir": out}).json()
        assert "output_dir" in j["errors"] and "inside the runs folder" in j["errors"]["output_dir"], out
    ok = ui.post("/api/validate", data={**base, "output_dir": "runs/a; rm -rf x"}).json()
    assert ok["ok"] and "'output_dir=runs/a; rm -rf x'" in ok["command"]  # one argument, never a shell


def _field_html(html: str, inp: str) -> str:
    """The markup of one form field (from its opening div to the next field's)."""
    start = html.index(f'data-input="{inp}"')
    start = html.rindex("<div", 0, start)
    end = html.find('<div class="field', start + 10)
    return html[start:end if end > 0 else len(html)]


def _wait(ui, run_id: str, timeout: float = 240) -> int:
    code = ui.jobs.wait(run_id, timeout)
    assert code is not None, f"{run_id} did not end in {timeout}s:\n{ui.jobs.log(run_id, 50)}"
    return code


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_form_and_the_cli_write_the_same_config(ui) -> None:
    values = {"model.name": "tiny-bert", "data.train": "data/train.csv", "data.validation": "data/val.csv",
              "method.name": "lora", "method[lora].r": "4", "method[lora].target_modules": "[query, value]",
              "train.max_steps": "4", "train.batch_size": "8", "train.lr": "1e-3", "train.tensorboard": "false",
              "train.precision": "fp32", "train.schedule": "cosine", "output_dir": "runs/same"}
    r = ui.post("/new", data={"_token": ui.token, "_recipe": "", **values}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/run/same"
    assert _wait(ui, "same") == 0, ui.jobs.log("same", 50)
    from_form = (ui.root / "runs" / "same" / "config.yaml").read_text()
    page = ui.get("/run/same").text
    assert 'class="status finished"' in page
    shutil.rmtree(ui.root / "runs" / "same")
    proc = _cli(ui.root, "train", "model=tiny-bert", "data.train=data/train.csv", "data.validation=data/val.csv",
                "method=lora", "method.r=4", "method.target_modules=[query, value]", "train.max_steps=4",
                "train.batch_size=8", "train.lr=1e-3", "train.tensorboard=false", "train.precision=fp32",
                "train.schedule=cosine", "output_dir=runs/same", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (ui.root / "runs" / "same" / "config.yaml").read_text() == from_form


@pytest.mark.slow
def test_stop_keeps_the_checkpoint_and_resume_finishes(ui) -> None:
    values = {"model.name": "tiny-bert", "data.train": "data/train.csv", "data.validation": "data/val.csv",
              "train.max_steps": "300", "train.batch_size": "8", "train.save_steps": "5", "train.eval_steps": "150",
              "train.log_steps": "5", "train.tensorboard": "false", "train.precision": "fp32", "output_dir": "runs/long"}
    r = ui.post("/new", data={"_token": ui.token, **values}, follow_redirects=False)
    assert r.status_code == 303
    run = ui.root / "runs" / "long"
    deadline = time.time() + 180
    while not list((run / "checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.2)
    assert list((run / "checkpoints").glob("step-*")), ui.jobs.log("long", 50)
    assert ui.get("/api/runs").json()[0]["status"] == "running"
    assert ui.post("/api/stop/long", data={"_token": ui.token}, follow_redirects=False).status_code == 303
    assert _wait(ui, "long", 60) == 130
    assert ui.get("/api/metrics/long").json()["status"] == "stopped"
    assert 'id="resume"' in ui.get("/run/long").text
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept and all((run / "checkpoints" / k / "state.json").is_file() for k in kept)
    stopped_at = int(kept[-1].split("-")[1])
    assert 0 < stopped_at < 300 and not (run / "metrics.json").exists()
    assert ui.post("/api/resume/long", data={"_token": ui.token}, follow_redirects=False).status_code == 303
    assert _wait(ui, "long") == 0, ui.jobs.log("long", 50)
    assert f"resumed from step {stopped_at}" in ui.jobs.log("long", 400)
    status = ui.get("/api/metrics/long").json()
    assert status["status"] == "finished" and status["step"] == 300
    steps = [r["step"] for r in status["records"] if r["split"] == "train"]
    assert steps == list(range(5, 301, 5))  # no step replayed or lost across the stop
