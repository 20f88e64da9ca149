"""Limits and knobs of one server: what `tuneforge serve` options set and `create_app` receives.

Every limit exists so that a bad or hostile client gets a 4xx answer instead of exhausting the process:
body bytes (before JSON parsing), prompt tokens (before the forward pass), ``max_tokens`` (before
generation), a bounded queue (429 when full) and a per-request timeout (503 when the work is not done).
"""

from __future__ import annotations

from pydantic import Field

from tuneforge.config.schema import StrictModel

__all__ = ["ServeSettings"]


class ServeSettings(StrictModel):
    """Server options (defaults suit a CPU; every one is a `tuneforge serve` option)."""

    host: str = Field("127.0.0.1", description="address to bind (loopback by default: not exposed)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    api_key: str | None = Field(None, description="bearer key every /v1 route and /metrics require when set")
    max_loaded: int = Field(8, ge=1, description="adapters held at once; the least recently used is evicted")
    max_batch_size: int = Field(32, ge=1, description="generated sequences per forward pass at most")
    batch_window_ms: float = Field(10.0, ge=0, le=1000, description="how long the first request of a batch "
                                   "waits for others of the same model and options")
    max_queue: int = Field(256, ge=1, description="requests waiting at most; more are answered 429")
    request_timeout_s: float = Field(300.0, gt=0, description="a request not served in this time is answered 503")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request bodies larger than this are answered 413")
    max_prompt_tokens: int = Field(2048, ge=1, description="prompt tokens per input at most (400 beyond)")
    max_tokens_cap: int = Field(1024, ge=1, description="largest max_tokens a request may ask for (400 beyond)")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a chat request that gives none")
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    max_inputs: int = Field(256, ge=1, description="texts per embeddings / classify / tag / answer request at most")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
