"""The serve worker without models: jobs of one key batch together (up to ``max_batch`` rows, within the
window), other keys never join, a full queue is a 429 in the OpenAI shape, a failing handler fails only
its batch and the worker lives on, and a waiter that gave up is skipped."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")

from tuneforge.serve.batcher import Batcher, Job, QueueFull
from tuneforge.serve.errors import APIError
from tuneforge.serve.pool import ModelPool
from tuneforge.serve.settings import ServeSettings
from tuneforge.serve.state import ServerState


def _recorder(seen: list[list[tuple[str, int]]]):
    def handler(jobs: list[Job]) -> None:
        seen.append([(j.key, j.payload) for j in jobs])
        for j in jobs:
            j.resolve(j.payload * 10)
    return handler


def test_jobs_batch_by_key_and_size() -> None:
    seen: list[list[tuple[str, int]]] = []
    b = Batcher(max_batch=3, window_s=0.2, max_queue=100)
    handler = _recorder(seen)
    futures = [b.submit(Job(k, handler, i)) for i, k in enumerate("aabaaab")]  # queued before the worker starts
    b.start()
    try:
        assert [f.result(5) for f in futures] == [i * 10 for i in range(7)]
    finally:
        b.stop()
    assert seen == [[("a", 0), ("a", 1), ("a", 3)], [("b", 2), ("b", 6)], [("a", 4), ("a", 5)]]
    assert all(len({k for k, _ in batch}) == 1 for batch in seen)


def test_window_collects_late_arrivals_of_the_same_key() -> None:
    seen: list[list[tuple[str, int]]] = []
    b = Batcher(max_batch=8, window_s=0.3, max_queue=100)
    b.start()
    try:
        handler = _recorder(seen)
        first = b.submit(Job("a", handler, 1))
        time.sleep(0.05)
        second = b.submit(Job("a", handler, 2))
        assert (first.result(5), second.result(5)) == (10, 20)
    finally:
        b.stop()
    assert seen == [[("a", 1), ("a", 2)]]


def test_full_queue_is_429_and_a_failing_handler_fails_only_its_batch() -> None:
    state = ServerState(ModelPool(), ServeSettings(max_queue=2, batch_window_ms=0))
    gate = threading.Event()

    def slow(jobs: list[Job]) -> None:
        gate.wait(5)
        for j in jobs:
            j.resolve("ok")

    def broken(jobs: list[Job]) -> None:
        raise RuntimeError("boom")

    f1 = state.submit(Job(None, slow))
    f2 = state.submit(Job(None, broken))
    with pytest.raises(APIError) as e:
        state.submit(Job(None, slow))
    assert e.value.status == 429 and e.value.code == "queue_full"
    state.batcher.start()
    try:
        gate.set()
        assert f1.result(5) == "ok"
        with pytest.raises(RuntimeError, match="boom"):
            f2.result(5)
        assert state.submit(Job(None, slow)).result(5) == "ok"  # the worker survived
    finally:
        state.batcher.stop()


def test_cancelled_waiters_are_skipped_and_stop_fails_pending() -> None:
    seen: list[list[tuple[str, int]]] = []
    b = Batcher(max_batch=4, window_s=0, max_queue=10)
    handler = _recorder(seen)
    gone = b.submit(Job("a", handler, 1))
    kept = b.submit(Job("a", handler, 2))
    gone.cancel()
    b.start()
    assert kept.result(5) == 20
    b.stop()
    assert seen == [[("a", 2)]]
    b2 = Batcher(max_queue=1)
    left = b2.submit(Job("a", handler, 3))
    with pytest.raises(QueueFull):
        b2.submit(Job("a", handler, 4))
    b2.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        left.result(1)


def test_a_request_not_served_in_time_is_503() -> None:
    import asyncio

    state = ServerState(ModelPool(), ServeSettings(request_timeout_s=0.2, batch_window_ms=0))
    gate = threading.Event()

    def blocked(jobs: list[Job]) -> None:
        gate.wait(5)
        for j in jobs:
            j.resolve("late")

    state.batcher.start()
    try:
        state.submit(Job(None, blocked))
        with pytest.raises(APIError) as e:
            asyncio.run(state.on_worker(lambda: "never"))
        assert e.value.status == 503 and e.value.code == "timeout"
    finally:
        gate.set()
        state.batcher.stop()


def test_a_cancelled_stream_stops_generating() -> None:
    """What a client leaving a stream sets (the route's ``finally``) ends generation at the next token."""
    from tuneforge.generation import GenerationOptions, load_model
    from tuneforge.serve.engine import stream_row

    loaded = load_model("tiny-llama", device="cpu")
    cancelled = threading.Event()
    pieces: list[str] = []

    def push(piece: str) -> None:
        pieces.append(piece)
        cancelled.set()  # the client is gone after the first piece

    opts = GenerationOptions(max_new_tokens=60)
    row = stream_row(loaded.model, loaded.tokenizer, "the cat", opts, chat=False, prompt_tokens=2, push=push,
                     cancelled=cancelled)
    assert len(pieces) >= 1 and row.completion_tokens < 10, row
    full = stream_row(loaded.model, loaded.tokenizer, "the cat", opts, chat=False, prompt_tokens=2,
                      push=lambda p: None, cancelled=threading.Event())
    assert full.completion_tokens > row.completion_tokens
