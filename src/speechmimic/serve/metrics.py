"""The server's Prometheus metrics, in a registry of their own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "speechmimic_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.audio_seconds = Counter(
            "speechmimic_audio_seconds", "seconds of audio answered (and charged)", registry=r
        )
        self.latency = Histogram(
            "speechmimic_request_latency_seconds",
            "time from request to answer",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.batch_clips = Histogram(
            "speechmimic_batch_clips",
            "clips per call of the model",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "speechmimic_batch_audio_seconds",
            "seconds of audio per call of the model",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120),
            registry=r,
        )
        self.key_requests = Counter(
            "speechmimic_key_requests", "requests charged, per key", ["key"], registry=r
        )
        self.key_seconds = Counter(
            "speechmimic_key_audio_seconds", "seconds of audio charged, per key", ["key"], registry=r
        )
        self.replays = Counter(
            "speechmimic_idempotent_replays", "answers sent again from the store, free", ["key"], registry=r
        )
        self.rejections = Counter(
            "speechmimic_rejections", "requests refused, by reason", ["reason"], registry=r
        )
        self.connections_closed = Counter(
            "speechmimic_connections_closed",
            "connections the server closed itself, by reason (header-timeout, body-timeout, "
            "header-too-large, evicted, over-capacity)",
            ["reason"],
            registry=r,
        )
        self.stored_answers = Gauge(
            "speechmimic_stored_answers", "answers kept for free resends (see --max-store-bytes)", registry=r
        )
        self.stored_bytes = Gauge(
            "speechmimic_stored_answer_bytes", "bytes of the stored answers", registry=r
        )
        self.queue = Gauge("speechmimic_queue_depth", "requests waiting for the model", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
