"""Worker for the non-finite test, started by torchrun: a classification run whose loss is NaN on one rank at
one micro-batch (``NAN_RANK``, ``NAN_CALL``); each rank writes ``outcome-rank<R>.json`` (finished, or the error
it raised) into the working directory, so the test sees what every rank did, not only what torchrun reports."""

from __future__ import annotations

import json
import os
import sys

from tuneforge.config import load_config
from tuneforge.errors import TrainingError
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import train

RANK = int(os.environ["RANK"])
calls = 0
_loss = ClassificationObjective.loss


def poisoned_loss(self, outputs, batch):
    global calls
    calls += 1
    loss = _loss(self, outputs, batch)
    if int(os.environ["NAN_RANK"]) == RANK and calls == int(os.environ["NAN_CALL"]):
        return loss * float("nan")
    return loss


ClassificationObjective.loss = poisoned_loss

try:
    train(load_config(None, sys.argv[1:]), overwrite=True, quiet=True)
    outcome = {"finished": True}
except TrainingError as e:
    outcome = {"finished": False, "error": str(e)}
with open(f"outcome-rank{RANK}.json", "w") as f:
    json.dump(outcome, f)
