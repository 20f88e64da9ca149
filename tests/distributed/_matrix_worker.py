"""Many training runs in one process: ``python _matrix_worker.py RUNS.json`` trains each run of the file one
after the other with the in-process pipeline, in the working directory. Under torchrun every rank does the
same, so one launch (one interpreter start, one process group) trains a whole matrix of 2-rank runs; without
a launcher it trains the one-process references. A run that fails raises: the process exits non-zero and
torchrun stops the other rank.

A run is a list of overrides (``tuneforge train`` arguments) or a mapping ``{"args": [...]}`` with options:
``"copy": [SRC, DST]``: rank 0 first copies folder SRC to DST (e.g. an early checkpoint of an earlier run into
a new run directory); ``"resume": true``: continue from the latest checkpoint (``--resume``);
``"nan_at": [RANK, CALL]``: the classification loss of rank RANK is NaN at its CALL-th micro-batch (1-based)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

from tuneforge.config import load_config
from tuneforge.engine.distributed import rank
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import train

LAUNCH_RANK = int(os.environ.get("RANK", "0"))  # known before the process group exists
_loss = ClassificationObjective.loss


def _poisoned(nan_rank: int, nan_call: int):
    calls = 0

    def loss(self, outputs, batch):
        nonlocal calls
        calls += 1
        value = _loss(self, outputs, batch)
        return value * float("nan") if nan_rank == LAUNCH_RANK and calls == nan_call else value

    return loss


for entry in json.loads(Path(sys.argv[1]).read_text()):
    run = entry if isinstance(entry, dict) else {"args": entry}
    if "copy" in run:
        if LAUNCH_RANK == 0:
            shutil.copytree(*run["copy"])
        if dist.is_initialized():
            dist.barrier()  # no rank looks for the checkpoint before it is there
    ClassificationObjective.loss = _poisoned(*run["nan_at"]) if "nan_at" in run else _loss
    t0 = time.perf_counter()
    train(load_config(None, run["args"]), overwrite=not run.get("resume"), resume=bool(run.get("resume")), quiet=True)
    if rank() == 0:
        print(f"{time.perf_counter() - t0:6.1f} s  {' '.join(run['args'])}", flush=True)
ClassificationObjective.loss = _loss
