"""Many training runs in one process: ``python _matrix_worker.py RUNS.json`` trains each run of the file (a
list of override lists, ``tuneforge train`` arguments) one after the other with the in-process pipeline,
in the working directory. Under torchrun every rank does the same, so one launch (one interpreter start,
one process group) trains a whole matrix of 2-rank runs; without a launcher it trains the one-process
references. A run that fails raises: the process exits non-zero and torchrun stops the other rank."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.engine.distributed import rank
from tuneforge.pipeline import train

for overrides in json.loads(Path(sys.argv[1]).read_text()):
    t0 = time.perf_counter()
    train(load_config(None, overrides), overwrite=True, quiet=True)
    if rank() == 0:
        print(f"{time.perf_counter() - t0:6.1f} s  {' '.join(overrides)}", flush=True)
