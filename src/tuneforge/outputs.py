"""What a finished run leaves behind: final metrics per split, the saved model folder and report.md.

Split out of `pipeline` so the wiring of a run reads on one screen; every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig
from tuneforge.engine.loops import FitResult
from tuneforge.engine.runtime import Runtime
from tuneforge.eval import flatten_metrics
from tuneforge.methods.saved import save_trained
from tuneforge.objectives.base import final_evaluation
from tuneforge.track import atomic_directory, read_metrics

__all__ = ["final_metrics", "save_model"]


def final_metrics(run: RunConfig, objective: Any, data: Any, tokenizer: Any, model: Any, runtime: Runtime,
                  result: FitResult, steps_per_epoch: int, run_dir: Path, params: tuple[int, int]) -> dict[str, Any]:
    """``metrics.json``: the train summary (``params``: trainable and total parameter counts), each evaluated
    split's metrics (with model-free baselines) and ``eval`` (validation, flat)."""
    st = result.state
    batch_size = run.train.eval_batch_size or 2 * run.train.batch_size
    losses = [r["loss"] for r in read_metrics(run_dir) if r.get("split") == "train" and r.get("loss") is not None]
    out: dict[str, Any] = {
        "train": {
            "steps": st.step, "epochs": round(st.step / steps_per_epoch, 4),
            "final_loss": losses[-1] if losses else None,
            "train_seconds": round(st.train_seconds, 3),
            "train_samples_per_s": st.samples_seen / st.train_seconds if st.train_seconds else None,
            "train_tokens_per_s": st.tokens_seen / st.train_seconds if st.train_seconds and st.tokens_seen else None,
            "precision": runtime.precision, "device": str(runtime.device), "best_step": st.best_step,
            "best_metric": st.best_metric, "stopped_early": st.stopped_early, "nonfinite_steps": st.nonfinite_total,
            "trainable_params": params[0], "total_params": params[1],
        },
        "splits": {},
    }
    for split in ("validation", "test"):
        if split not in data.splits:
            continue
        batches = objective.prepare(data.splits[split], tokenizer, run)
        m = final_evaluation(objective, model, batches, batch_size=batch_size, runtime=runtime)
        m.update(objective.baseline_metrics(data.splits["train"], data.splits[split]))
        out["splits"][split] = m
    out["eval"] = flatten_metrics(out["splits"].get("validation", {}))
    return out


def save_model(out: Path, model: Any, tokenizer: Any, objective: Any, data: Any, run: RunConfig,
               model_path: Path) -> None:
    """The trained model as a Hugging Face folder (written atomically); see `methods.saved`."""
    with atomic_directory(out) as tmp:
        save_trained(model, tmp, run.method, model_path)
        tokenizer.save_pretrained(tmp)
        objective.save_artifacts(tmp, data)
