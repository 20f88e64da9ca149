"""Counters the server exposes on ``/metrics`` (Prometheus text format) and ``/health``."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

__all__ = ["Metrics", "percentile"]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Metrics:
    """Requests per route and status, recent latencies, generated tokens (thread-safe)."""

    def __init__(self, window: int = 2048):
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latencies: deque[float] = deque(maxlen=window)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generation_seconds = 0.0
        self._lock = threading.Lock()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latencies.append(seconds)

    def tokens(self, prompt: int, completion: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.generation_seconds += seconds

    def render(self, extra: dict[str, float]) -> str:
        """Prometheus exposition text; ``extra`` adds gauges (queue depth, loaded adapters...)."""
        with self._lock:
            lat = list(self.latencies)
            lines = ["# TYPE tuneforge_requests_total counter"]
            lines += [f'tuneforge_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            tps = self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0
            values = {
                "tuneforge_prompt_tokens_total": self.prompt_tokens,
                "tuneforge_completion_tokens_total": self.completion_tokens,
                "tuneforge_generation_tokens_per_second": round(tps, 3),
                "tuneforge_latency_p50_seconds": round(percentile(lat, 0.5), 6),
                "tuneforge_latency_p95_seconds": round(percentile(lat, 0.95), 6),
                "tuneforge_uptime_seconds": round(time.time() - self.started, 3),
                **extra,
            }
        lines += [f"tuneforge_{k.removeprefix('tuneforge_')} {v}" for k, v in values.items()]
        return "\n".join(lines) + "\n"
