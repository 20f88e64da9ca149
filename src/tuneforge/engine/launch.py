"""`tuneforge train --nproc N`: start the same command under ``torchrun`` on this machine.

``torchrun --standalone`` runs a local rendezvous on a free port and exports ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` to each of the N workers, which is what
`engine.distributed` reads. Several machines need torchrun's own rendezvous flags (``--nnodes``,
``--rdzv-endpoint``): see docs/distributed.md.
"""

from __future__ import annotations

import subprocess
import sys

__all__ = ["torchrun", "torchrun_command"]


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command line that runs ``tuneforge ARGS`` in ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tuneforge", *args]


def torchrun(nproc: int, args: list[str]) -> int:
    """Run ``tuneforge ARGS`` under torchrun; returns its exit code (the first failing worker's)."""
    return subprocess.call(torchrun_command(nproc, args))
