"""The server's settings: defaults < a JSON file (``--config``) < ``SPEECHMIMIC_SERVE_*`` variables <
flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from speechmimic.config import option
from speechmimic.errors import InputError

ENV_PREFIX = "SPEECHMIMIC_SERVE_"
INFO_FIELDS = ("layers", "widths", "frame_rate", "min_samples", "padding", "limits", "batch")


@dataclass
class ServeConfig:
    target: str = option(
        "",
        "the encoder to serve, a target spec (e.g. 'resemblyzer?layers=all', 'hf:DIR'), optionally "
        "with defences after '|', applied per API key (e.g. 'resemblyzer|transform?seed=7'); required",
        metavar="SPEC",
    )
    db: str = option(
        "serve.sqlite",
        "SQLite file of API keys, usage and stored answers (created if absent)",
        metavar="FILE",
    )
    defence_state: str | None = option(
        None,
        "SQLite file of the defences' per-key state (only with defences in the target spec); "
        "default: beside --db as <db stem>.defences.sqlite",
        metavar="FILE",
    )
    host: str = option("127.0.0.1", "address to listen on (loopback by default: expose it on purpose)")
    port: int = option(8000, "port to listen on; 0 picks a free one (see --ready-file)")
    ready_file: str | None = option(
        None,
        "once serving, write {url, pid} as JSON to this file (for scripts that start the server)",
        metavar="FILE",
    )
    max_batch_seconds: float = option(
        30.0, "dynamic batching: most seconds of audio in one call of the target (a longer clip runs alone)"
    )
    max_delay_ms: float = option(
        5.0, "dynamic batching: longest a request waits for others to join its batch"
    )
    max_queue: int = option(256, "requests waiting for the model beyond which new ones get 429 (server busy)")
    max_payload_bytes: int = option(
        32 * 1024 * 1024, "largest request body accepted from any key (a key may allow less)"
    )
    max_clip_seconds: float = option(120.0, "longest clip accepted from any key (a key may allow less)")
    max_batch_clips: int = option(
        64, "clips one request to /v1/embed/batch may carry (the payload limit applies to the whole request)"
    )
    hide_info: str = option(
        "",
        f"comma list of /v1/info fields to hide from clients, of {', '.join(INFO_FIELDS)}; 'all' hides it",
        metavar="FIELDS",
    )
    header_timeout: float = option(
        10.0,
        "seconds a client has to send a request's line and headers, from connecting (or from its first "
        "byte after an answer); then 408 and the connection is closed",
    )
    body_timeout: float = option(
        10.0,
        "seconds a request's body may take, plus one second per --body-min-rate bytes received; then 408 "
        "and the connection is closed",
    )
    body_min_rate: float = option(16384.0, "bytes per second a slow body must keep up (see --body-timeout)")
    keepalive_timeout: float = option(30.0, "seconds an idle connection stays open after an answer")
    max_header_bytes: int = option(
        16384, "largest request line and headers; beyond, 431 and the connection is closed"
    )
    max_connections: int = option(
        0,
        "open connections at most; beyond, the one waiting longest for a request is closed (0: the "
        "process's descriptor limit less 64, at most 4096)",
    )
    max_inflight_bytes: int = option(
        128 * 1024 * 1024, "request bodies held at once, all keys together; beyond, 503 with Retry-After"
    )
    max_key_inflight_bytes: int = option(
        64 * 1024 * 1024, "request bodies held at once for one key; beyond, 429 with Retry-After"
    )
    answers_ttl_hours: float = option(
        168.0, "how long answers stay stored under their Idempotency-Key (a resend within it is free)"
    )
    resend_ttl_seconds: float = option(
        600.0,
        "how long an answer to a request without an Idempotency-Key stays stored under the request's "
        "content: the same request sent again within it is answered from the store, free",
    )
    max_store_bytes: int = option(
        1024**3,
        "stored answers at most; beyond, the oldest are dropped, those without an Idempotency-Key first "
        "(checked every minute)",
    )
    purge_seconds: float = option(60.0, "how often stored answers past their time (or the cap) are dropped")
    metrics_token: str | None = option(
        None,
        "a token that GET /metrics must bring as 'Authorization: Bearer TOKEN' (metrics name every key); "
        "without one /metrics is off. Prefer SPEECHMIMIC_SERVE_METRICS_TOKEN: flags show in ps",
        metavar="TOKEN",
    )
    docs: bool = option(True, "serve /docs and /openapi.json (the API's schema)")
    device: str = option("cpu", "torch device of the served model")
    threads: int = option(0, "torch threads of the model (0: torch's default)")
    model_workers: int = option(
        1,
        "batches the model answers at once, each in its own thread (for thread-safe targets: hf and "
        "resemblyzer are); on CPUs shared with other processes, N workers with --threads 1 use N cores best",
    )

    def hidden(self) -> set[str]:
        names = {x.strip() for x in self.hide_info.split(",") if x.strip()}
        if "all" in names:
            return {"all", *INFO_FIELDS}
        unknown = names - set(INFO_FIELDS)
        if unknown:
            raise InputError(
                f"hide_info: unknown field(s) {sorted(unknown)}; valid: {list(INFO_FIELDS)} or all"
            )
        return names

    def defence_state_path(self) -> str:
        if self.defence_state:
            return self.defence_state
        db = Path(self.db)
        return str(db.with_name(db.stem + ".defences.sqlite"))

    def check(self) -> None:
        if not self.target:
            raise InputError("serve needs a target spec (--target, or 'target' in the config file)")
        if "|" in self.target:
            from speechmimic.defences import parse_chain

            if parse_chain(self.target)[2] is not None:
                raise InputError(
                    f"serve answers each request as its API key: drop the 'account?...' segment of "
                    f"{self.target!r} (the defences' state goes in --defence-state)"
                )
        for name in (
            "max_batch_seconds",
            "max_payload_bytes",
            "max_clip_seconds",
            "max_batch_clips",
            "max_queue",
            "model_workers",
            "header_timeout",
            "body_timeout",
            "body_min_rate",
            "keepalive_timeout",
            "max_header_bytes",
            "max_inflight_bytes",
            "max_key_inflight_bytes",
            "resend_ttl_seconds",
            "max_store_bytes",
            "purge_seconds",
        ):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_delay_ms < 0 or self.answers_ttl_hours <= 0 or self.max_connections < 0:
            raise InputError("max_delay_ms and max_connections must be >= 0 and answers_ttl_hours > 0")
        self.hidden()
