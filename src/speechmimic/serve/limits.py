"""Per-key token buckets: ``rate`` requests per second on average, bursts of up to ``burst``.

Kept in memory: a restarted server starts every bucket full, which errs towards the client and never
loses accounting (quotas, which must survive restarts, live in the key store).
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key_id: int, rate: float | None, burst: float | None) -> float | None:
        """Take one token from the key's bucket: ``None`` if there was one, else the seconds until there
        will be (nothing is taken then). A key without a rate is never limited."""
        if rate is None:
            return None
        size = burst if burst is not None else max(1.0, rate)
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (size, now))
            tokens = min(size, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate
