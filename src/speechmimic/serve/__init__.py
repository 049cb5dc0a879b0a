"""``speechmimic serve``: put any target behind an embedding API with keys, quotas and limits.

- :mod:`.config`: the server's settings (file < environment < flags);
- :mod:`.keys`: API keys (hashed), their limits and their usage, in SQLite; the answers stored
  under idempotency keys, committed in the same transaction as the charge;
- :mod:`.limits`: per-key token buckets (in memory: a restart refills them);
- :mod:`.batcher`: dynamic batching of concurrent requests into one target call;
- :mod:`.metrics`: the Prometheus metrics;
- :mod:`.reservations`: per key, what is being answered and not yet charged (the quota counts it);
- :mod:`.problems`: error answers as RFC 9457 problem documents;
- :mod:`.embed`: ``POST /v1/embed`` step by step, from the rate limit to the charge;
- :mod:`.app`: the FastAPI application (routes, authentication, the OpenAPI schema);
- :mod:`.server`: running it with uvicorn on a socket of our own.
"""
