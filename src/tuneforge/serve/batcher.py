"""One worker thread that runs all model work, batching queued requests that share a key.

Requests for the same model with the same decoding options share a key; the worker takes the oldest
pending job, waits up to ``window_s`` for more of its key (up to ``max_batch`` rows), and hands them to
the job's handler in one call, so one forward pass serves them all. Jobs of other keys wait their turn:
requests for different adapters are never mixed in a batch, and because every batch (and every adapter
load or unload) runs on this one thread, an adapter switch never happens under a running batch.

The queue is bounded (`QueueFull` past ``max_queue`` pending jobs: the route answers 429). Results come
back as `concurrent.futures.Future` objects that async routes await with ``asyncio.wrap_future``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batcher", "Job", "QueueFull"]


class QueueFull(Exception):
    """Too many pending jobs."""


@dataclass(eq=False)
class Job:
    """A unit of queued work; ``key`` None never batches with anything."""

    key: Hashable | None
    handler: Callable[[list[Job]], None]
    payload: Any = None
    rows: int = 1
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    def resolve(self, value: Any) -> None:
        """Set the result unless the waiter gave up (timed out or cancelled)."""
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Batcher:
    """The worker (see module docstring); `start` it once, `stop` it at shutdown."""

    def __init__(self, max_batch: int = 32, window_s: float = 0.01, max_queue: int = 256):
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batches = 0
        self.batched_rows = 0
        self.busy = False

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tuneforge-serve-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            job.fail(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises `QueueFull` when ``max_queue`` jobs already wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the limit)")
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            if first.key is not None and self.window_s > 0:
                deadline = first.enqueued + self.window_s
                while (left := deadline - time.monotonic()) > 0 and self._rows(first.key) < self.max_batch \
                        and not self._stopping:
                    self._cond.wait(left)
            take = [first] if first.key is None else self._select(first)
            taken = set(map(id, take))
            self._pending = [j for j in self._pending if id(j) not in taken]
            return [j for j in take if not j.future.done()]  # drop jobs whose waiter gave up

    def _rows(self, key: Hashable) -> int:
        return sum(j.rows for j in self._pending if j.key == key)

    def _select(self, first: Job) -> list[Job]:
        take, rows = [], 0
        for j in self._pending:
            if j.key == first.key and (not take or rows + j.rows <= self.max_batch):
                take.append(j)
                rows += j.rows
        return take

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            if not jobs:
                continue
            self.busy = True
            try:
                jobs[0].handler(jobs)
                self.batches += 1
                self.batched_rows += sum(j.rows for j in jobs)
            except BaseException as e:  # the handler's bug must not kill the worker
                for j in jobs:
                    j.fail(e)
            finally:
                self.busy = False
