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

    @staticmethod
    def size(rate: float, burst: float | None) -> float:
        """The bucket's size: the most tokens a key can spend at once."""
        return burst if burst is not None else max(1.0, rate)

    def take(self, key_id: int, rate: float | None, burst: float | None, n: int = 1) -> float | None:
        """Take ``n`` tokens from the key's bucket: ``None`` if it had them, else the seconds until it
        will (nothing is taken then). A key without a rate is never limited."""
        if rate is None:
            return None
        size = self.size(rate, burst)
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (size, now))
            tokens = min(size, tokens + (now - at) * rate)
            if tokens >= n:
                self._buckets[key_id] = (tokens - n, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return (n - tokens) / rate
