"""Training processes the UI starts, stops and resumes.

A run is ``python -m tuneforge train ARGS`` in a child process: the arguments are a list (no shell ever
parses them) made of the recipe path and ``key=value`` overrides that `tuneforge.ui.form` built and the
same pydantic validation already accepted. The child runs in its own session, so stopping the UI does not
stop a run; its output goes to ``<runs>/.tuneforge-ui/<run>.log`` and a small JSON record beside it
(pid, arguments, exit code) lets a restarted UI find it again.

Stop sends SIGINT, as Ctrl-C does in a terminal: the run exits with 130 and the last checkpoint stays intact
(checkpoints are written to a temporary path and renamed). Resume runs ``tuneforge train
<run>/config.yaml --resume``, which continues from that checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tuneforge.track.atomic import atomic_write_json
from tuneforge.ui.runs import UI_DIR, RunsFolder, log_tail

__all__ = ["JobManager"]

_TOTAL_RE = re.compile(r"training: [\d,]+ examples, ([\d,]+) steps")


class JobManager:
    """Children started from the UI, keyed by run id; records persist in the runs folder."""

    def __init__(self, folder: RunsFolder, cwd: Path | None = None, python: str = sys.executable):
        self.folder, self.cwd, self.python = folder, Path(cwd or Path.cwd()), python
        self.dir = folder.root / UI_DIR
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def _paths(self, run_id: str) -> tuple[Path, Path]:
        stem = run_id.replace("/", "__")
        return self.dir / f"{stem}.json", self.dir / f"{stem}.log"

    def launch(self, run_id: str, args: list[str]) -> dict[str, Any]:
        """Start ``tuneforge ARGS`` for the run ``run_id`` (refused while that run is already running)."""
        if not all(isinstance(a, str) for a in args):
            raise TypeError("arguments are strings")
        with self._lock:
            current = self.record(run_id)
            if current is not None and current.get("alive"):
                raise RuntimeError(f"run {run_id} is already running (pid {current['pid']})")
            self.dir.mkdir(parents=True, exist_ok=True)
            rec_path, log_path = self._paths(run_id)
            argv = [self.python, "-m", "tuneforge", *args]
            env = dict(os.environ)
            env.setdefault("HF_HUB_OFFLINE", "1")
            env["PYTHONUNBUFFERED"] = "1"
            with log_path.open("ab") as log:
                log.write(("$ tuneforge " + " ".join(args) + "\n").encode())
                log.flush()
                proc = subprocess.Popen(argv, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self._procs[run_id] = proc
            rec = {"run": run_id, "args": args, "pid": proc.pid, "started": time.time(), "returncode": None,
                   "log": log_path.name}
            atomic_write_json(rec_path, rec)
            return {**rec, "alive": True}

    def record(self, run_id: str) -> dict[str, Any] | None:
        """The run's last launch record with ``alive`` (and the exit code once the UI saw it end)."""
        rec_path, _ = self._paths(run_id)
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        proc = self._procs.get(run_id)
        if proc is not None and proc.pid == rec.get("pid"):
            code = proc.poll()
            rec["alive"] = code is None
            if code is not None and rec.get("returncode") is None:
                rec["returncode"] = code
                rec["ended"] = time.time()
                atomic_write_json(rec_path, {k: v for k, v in rec.items() if k != "alive"})
        else:  # launched by an earlier UI process: alive while its pid is
            rec["alive"] = rec.get("returncode") is None and _pid_alive(rec.get("pid"))
        return rec

    def runs(self) -> list[str]:
        """Run ids with a launch record."""
        if not self.dir.is_dir():
            return []
        ids = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                ids.append(str(json.loads(p.read_text(encoding="utf-8"))["run"]))
            except (OSError, ValueError, KeyError):
                continue
        return ids

    def stop(self, run_id: str) -> bool:
        """SIGINT the run's process (as Ctrl-C); False when it is not running."""
        rec = self.record(run_id)
        if rec is None or not rec.get("alive"):
            return False
        os.kill(int(rec["pid"]), signal.SIGINT)
        return True

    def wait(self, run_id: str, timeout: float | None = None) -> int | None:
        """Exit code of the run's process once it ends (tests and shutdown)."""
        proc = self._procs.get(run_id)
        if proc is None:
            return None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.record(run_id)
        return proc.returncode

    def log(self, run_id: str, lines: int = 30) -> str:
        return log_tail(self._paths(run_id)[1], lines)

    def total_steps(self, run_id: str) -> int | None:
        """Optimizer steps of the run, from the line `tuneforge train` prints when training starts."""
        found = _TOTAL_RE.findall(log_tail(self._paths(run_id)[1], 400))
        return int(found[-1].replace(",", "")) if found else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (ended, not yet reaped by its parent) is not running
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True
