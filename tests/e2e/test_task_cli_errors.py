"""Bad inputs to the NER, QA and multi-task objectives through the real CLI: exit code 2, one line on stderr
naming the file and line (data) or the key (config), and no run directory left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _common import cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("task-errors")
    (d / "good.conll").write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n\n", encoding="utf-8")
    (d / "ragged.conll").write_text("EU NNP B-NP B-ORG\nrejects VBZ O\n\n", encoding="utf-8")
    (d / "mismatch.jsonl").write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["B-X"]}\n',
                                      encoding="utf-8")
    rows = [{"question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [0]}},
            {"question": "What?", "context": "Ada wrote it.", "answers": {"text": ["wrote"], "answer_start": [5]}}]
    (d / "bad-start.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return d


CASES = {
    "ragged CoNLL line": (["task=token_classification", "data.train=ragged.conll"],
                          "ragged.conll:2: 3 columns, but line 1 has 4"),
    "tokens/tags mismatch": (["task=token_classification", "data.train=mismatch.jsonl"],
                             "mismatch.jsonl:2: 2 tokens but 1 tags"),
    "answer_start off its text": (["task=extractive_qa", "data.train=bad-start.jsonl"], "bad-start.jsonl:2"),
    "doc_stride too large": (["task=extractive_qa", "data.train=bad-start.jsonl", "task.doc_stride=384"],
                             "config error at 'task.doc_stride'"),
    "multi-task with a generative task": (["task=multitask", "task.tasks.a.task=classification",
                                           "task.tasks.b.task=clm"], "'clm' has no task head"),
    "multi-task task's own bad file": (["task=multitask", "task.tasks.a.task=token_classification",
                                        "task.tasks.a.data.train=ragged.conll", "task.tasks.b.task=token_classification",
                                        "task.tasks.b.data.train=good.conll"], "ragged.conll:2:"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case: str, files: Path) -> None:
    args, needle = CASES[case]
    out = files / f"run-{abs(hash(case))}"
    proc = cli("train", "model=tiny-bert", *args, f"output_dir={out}", cwd=files, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists()
