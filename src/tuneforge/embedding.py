"""``tuneforge embed``: sentence vectors of a file's texts from a contrastive run or any encoder.

A run directory whose objective declares ``ObjectiveSpec(embeds=True)`` (contrastive) encodes with its own
pooling; a registry model name or a local HF folder encodes with mean pooling over an ``AutoModel``. Texts
come from ``--input``: a txt file (one per line) or csv/tsv/json/jsonl/parquet (``data.text_column``,
default ``text``). Output: ``.npy`` (float32 [N, H], row i = text i) or ``.jsonl`` (``{"text", "embedding"}``),
written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from tuneforge.errors import ConfigError

__all__ = ["embed_file"]


def embed_file(target: Path, input_file: Path, output: Path, overrides: list[str]) -> int:
    """Encode every text of ``input_file`` with ``target`` into ``output``; returns the number of texts."""
    from tuneforge.config import load_config
    from tuneforge.data.readers import column_values, detect_format, read_table, resolve_column
    from tuneforge.engine import Runtime
    from tuneforge.inference import load_run
    from tuneforge.models.registry import resolve_model
    from tuneforge.objectives import get_objective, get_spec
    from tuneforge.track.atomic import atomic_write_bytes, atomic_write_text
    from tuneforge.track.rundir import model_folder

    if output.suffix not in (".npy", ".jsonl"):
        raise ConfigError(f"--output must end in .npy or .jsonl, got {output.name}")
    if (target / "config.yaml").is_file():
        run = load_run(target, overrides)
        if not get_spec(run.task.name).embeds:
            raise ConfigError(f"{target} is a '{run.task.name}' run, which does not produce sentence vectors; "
                              "embed a task=contrastive run or a model", key="task")
        folder = model_folder(target)
    else:
        run = load_config(None, [f"model={target}", "task=contrastive", *overrides])
        folder = resolve_model(run.model.name)
    objective = get_objective(run)
    runtime = Runtime.for_run(run.train)
    built = objective.from_saved(folder)
    built.model = runtime.move(built.model)
    fmt = detect_format(input_file)  # the input's own format, not the training data's
    table = read_table(input_file, fmt, header=run.data.header, quoting=run.data.quoting,
                       delimiter=run.data.delimiter, encoding=run.data.encoding)
    column = "text" if fmt == "txt" else resolve_column(table, run.data.text_column, "text column")
    texts = [str(t) for t in column_values(table, column, role="text")]
    vectors = objective.encode(built, texts, batch_size=run.train.eval_batch_size or 2 * run.train.batch_size,
                               runtime=runtime).numpy().astype(np.float32)
    if output.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, vectors)
        atomic_write_bytes(output, buf.getvalue())
    else:
        atomic_write_text(output, "".join(json.dumps({"text": t, "embedding": v.tolist()}, ensure_ascii=False) + "\n"
                                          for t, v in zip(texts, vectors, strict=True)))
    return len(texts)
