"""The server's shared state and the job handlers that turn queued requests into forward passes.

Routes validate a request, then call `ServerState.generate` / `stream` / `embed` / `predict`, which queue
a job on the `Batcher` and await it; the handlers below run on the worker thread, bind the requested
model (`ModelPool.bound`: adapter activated, or base with adapters disabled), render and check each
prompt (a bad prompt fails only its own request), and run one batched pass for all the jobs taken.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tuneforge.generation import GenerationOptions
from tuneforge.serve.batcher import Batcher, Job, QueueFull
from tuneforge.serve.engine import Row, check_prompt, embed, generate_rows, render, stream_row
from tuneforge.serve.errors import APIError
from tuneforge.serve.metrics import Metrics
from tuneforge.serve.pool import ModelPool, Served
from tuneforge.serve.settings import ServeSettings

__all__ = ["GenPayload", "ServerState"]

Prompt = str | list[dict[str, str]]


@dataclass
class GenPayload:
    """What one generation request asks: its prompts, each answered ``n`` times."""

    entry: Served
    prompts: list[Prompt]
    options: GenerationOptions
    chat: bool
    n: int = 1
    push: Callable[[tuple[str, Any]], None] | None = None  # streaming: events to the route
    cancelled: threading.Event | None = None


class ServerState:
    """Pool, batcher, settings and metrics of one app (``app.state.serve``)."""

    def __init__(self, pool: ModelPool, settings: ServeSettings, metrics: Metrics | None = None):
        self.pool, self.settings = pool, settings
        self.metrics = metrics or Metrics()
        self.batcher = Batcher(settings.max_batch_size, settings.batch_window_ms / 1000, settings.max_queue)

    # -- queueing -------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        try:
            return self.batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", code="queue_full") from None

    async def wait(self, fut: Future) -> Any:
        """The job's result, or 503 after ``request_timeout_s``."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"the request was not served within {self.settings.request_timeout_s:g} s",
                           code="timeout") from None

    async def on_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` between batches (adapter loads and unloads)."""
        return await self.wait(self.submit(Job(None, _call, fn)))

    def options(self, max_tokens: int | None, default: int, temperature: float | None, top_p: float | None,
                stop: list[str] | None, seed: int | None, n: int) -> GenerationOptions:
        """Decoding options of a request, checked against the server's caps (400 naming the field)."""
        s = self.settings
        want = max_tokens if max_tokens is not None else min(default, s.max_tokens_cap)
        if want > s.max_tokens_cap:
            raise APIError(400, f"max_tokens is {want}; this server allows at most {s.max_tokens_cap}",
                           param="max_tokens", code="max_tokens_exceeded")
        if n > s.max_n:
            raise APIError(400, f"n is {n}; this server allows at most {s.max_n}", param="n", code="n_exceeded")
        # As vLLM: below 1e-5 is greedy, and a positive temperature is at least 0.01 (logits / 1e-30 overflow
        # to inf and the sampler's probabilities become NaN).
        sample = temperature is not None and temperature >= 1e-5
        temperature = max(temperature, 0.01) if sample and temperature is not None else None
        return GenerationOptions(max_new_tokens=want, do_sample=sample, temperature=temperature,
                                 top_p=top_p if sample else None, stop=stop or [], seed=seed, chat=None)

    # -- generation -----------------------------------------------------------------------------------
    async def generate(self, payload: GenPayload) -> list[list[Row]]:
        """Rows per prompt (``n`` each), batched with concurrent requests of the same model and options."""
        # max_tokens is not part of the key: rows of different limits share a batch (see generate_rows)
        key = (payload.entry.name, "generate", payload.chat, payload.options.model_dump_json(exclude={"max_new_tokens"}))
        rows = len(payload.prompts) * payload.n
        if rows > self.settings.max_batch_size:
            raise APIError(400, f"this request asks for {rows} sequences (prompts x n); the limit is "
                                f"{self.settings.max_batch_size}", param="n", code="too_many_sequences")
        return await self.wait(self.submit(Job(key, self._generate, payload, rows=rows)))

    def _generate(self, jobs: list[Job]) -> None:
        entry = self.pool.get(jobs[0].payload.entry.name)  # 404 if it was unloaded while queued
        first: GenPayload = jobs[0].payload
        texts: list[str] = []
        counts: list[int] = []
        limits: list[int] = []
        spans: list[tuple[Job, int]] = []  # (job, number of its prompts)
        with self.pool.bound(entry) as model:
            for job in jobs:
                p: GenPayload = job.payload
                try:
                    rendered = [render(entry.tokenizer, q, p.chat, entry.system_prompt) for q in p.prompts]
                    ns = [check_prompt(entry.tokenizer, model, t, p.chat, p.options.max_new_tokens,
                                       self.settings.max_prompt_tokens) for t in rendered]
                except APIError as e:
                    job.fail(e)
                    continue
                for t, c in zip(rendered, ns, strict=True):
                    texts += [t] * p.n
                    counts += [c] * p.n
                    limits += [p.options.max_new_tokens] * p.n
                spans.append((job, len(rendered)))
            if not texts:
                return
            t0 = time.perf_counter()
            options = first.options.model_copy(update={"max_new_tokens": max(limits)})
            out = generate_rows(model, entry.tokenizer, texts, options, chat=first.chat, prompt_tokens=counts,
                                limits=limits)
        self.metrics.tokens(sum(counts), sum(r.completion_tokens for r in out), time.perf_counter() - t0)
        at = 0
        for job, k in spans:
            n = job.payload.n
            job.resolve([out[at + i * n: at + (i + 1) * n] for i in range(k)])
            at += k * n

    def stream(self, payload: GenPayload) -> Future:
        """Queue a streamed generation; events go to ``payload.push``: ("start", prompt tokens),
        ("text", piece)..., then ("end", Row) or ("error", exception)."""
        return self.submit(Job(None, self._stream, payload))

    def _stream(self, jobs: list[Job]) -> None:
        job = jobs[0]
        p: GenPayload = job.payload
        assert p.push is not None and p.cancelled is not None
        try:
            entry = self.pool.get(p.entry.name)
            with self.pool.bound(entry) as model:
                text = render(entry.tokenizer, p.prompts[0], p.chat, entry.system_prompt)
                n = check_prompt(entry.tokenizer, model, text, p.chat, p.options.max_new_tokens,
                                 self.settings.max_prompt_tokens)
                p.push(("start", n))
                t0 = time.perf_counter()
                row = stream_row(model, entry.tokenizer, text, p.options, chat=p.chat, prompt_tokens=n,
                                 push=lambda s: p.push(("text", s)), cancelled=p.cancelled)  # type: ignore[misc]
            self.metrics.tokens(n, row.completion_tokens, time.perf_counter() - t0)
            p.push(("end", row))
            job.resolve(row)
        except Exception as e:
            p.push(("error", e))
            job.resolve(None)

    # -- embeddings and task runs ---------------------------------------------------------------------
    async def embed(self, entry: Served, texts: list[str]) -> tuple[list[Any], list[int]]:
        """Mean-pooled vectors and token counts, batched with concurrent requests to the same model."""
        self._check_inputs(texts)
        return await self.wait(self.submit(Job((entry.name, "embed"), self._embed, (entry, texts), rows=len(texts))))

    def _embed(self, jobs: list[Job]) -> None:
        entry = self.pool.get(jobs[0].payload[0].name)
        texts = [t for j in jobs for t in j.payload[1]]
        with self.pool.bound(entry) as model:
            try:
                vecs, counts = self._vectors(entry, model, texts)
            except APIError as e:
                if len(jobs) == 1:
                    raise
                for j in jobs:  # find whose input failed: each job alone
                    try:
                        j.resolve(self._vectors(entry, model, j.payload[1]))
                    except APIError as e2:
                        j.fail(e2)
                del e
                return
        at = 0
        for j in jobs:
            k = len(j.payload[1])
            j.resolve((vecs[at:at + k], counts[at:at + k]))
            at += k

    def _vectors(self, entry: Served, model: Any, texts: list[str]) -> tuple[list[Any], list[int]]:
        """A sentence encoder run (``ObjectiveSpec.embeds``) encodes with its own pooling (what ``tuneforge
        embed`` writes); any other model mean-pools its last hidden states."""
        objective = entry.objective
        if objective is None or not objective.spec.embeds:
            return embed(model, entry.tokenizer, texts, self.settings.max_prompt_tokens)
        counts = [len(ids) for ids in entry.tokenizer(texts)["input_ids"]]
        if max(counts) > self.settings.max_prompt_tokens:
            i = max(range(len(counts)), key=counts.__getitem__)
            raise APIError(400, f"input {i} has {counts[i]} tokens; this server accepts at most "
                                f"{self.settings.max_prompt_tokens}", param="input", code="context_length_exceeded")
        vecs = objective.encode(entry.built, texts, batch_size=32, runtime=entry.runtime)
        return list(vecs), counts

    async def predict(self, entry: Served, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        """The run objective's ``predict`` rows for ``texts`` (and ``pairs``), in order."""
        self._check_inputs(texts)
        key = (entry.name, "predict", pairs is not None)
        return await self.wait(self.submit(Job(key, self._predict, (entry, texts, pairs), rows=len(texts))))

    def _predict(self, jobs: list[Job]) -> None:
        from tuneforge.errors import TuneforgeError

        entry = self.pool.get(jobs[0].payload[0].name)
        texts = [t for j in jobs for t in j.payload[1]]
        pairs = None if jobs[0].payload[2] is None else [t for j in jobs for t in j.payload[2]]
        try:
            rows = entry.objective.predict(entry.built, texts, pairs, batch_size=32, runtime=entry.runtime)
        except TuneforgeError as e:
            raise APIError(400, str(e), param="input", code="invalid_input") from None
        at = 0
        for j in jobs:
            k = len(j.payload[1])
            j.resolve(rows[at:at + k])
            at += k

    def _check_inputs(self, texts: list[str]) -> None:
        if len(texts) > self.settings.max_inputs:
            raise APIError(400, f"{len(texts)} inputs; this server accepts at most {self.settings.max_inputs} per "
                                "request", param="input", code="too_many_inputs")
        limit = self.settings.max_prompt_tokens * 16  # characters: a cheap bound before tokenizing
        if any(len(t) > limit for t in texts):
            raise APIError(400, f"an input is longer than {limit} characters", param="input",
                           code="context_length_exceeded")


def _call(jobs: list[Job]) -> None:
    for j in jobs:
        try:
            j.resolve(j.payload())
        except BaseException as e:
            j.fail(e)
